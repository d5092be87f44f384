"""DeepSeek-V3's multi-token-prediction (MTP) module, loaded from a shipped FP8 folder for the optional MTP loss.

The checkpoint stores the MTP module (depth 1) as layer ``num_hidden_layers``: ``enorm``, ``hnorm``, ``eh_proj``, a
full DeepSeek-V3 decoder layer (``self_attn``, ``mlp``, the two layer norms), ``shared_head.{norm,head}`` and a copy
of ``embed_tokens``. `attach_mtp` builds that layer as a `DeepseekV3MTPLayer` (transformers' DeepseekV3DecoderLayer
with the MTP's extra modules, layer index ``num_hidden_layers``), keeps its FP8 linears e4m3 (dsft's FP8Linear /
FP8Experts) and appends it to ``model.model.layers``, so its parameters carry the checkpoint's names
(``model.layers.61.self_attn.q_a_proj`` …) and LoRA attaches to it like to the main layers. The decoder runs only
``layers[:num_hidden_layers]``, so the main model's outputs do not change.

For position i (DeepSeek-V3 report §2.2; the concat order — embedding first — is the one of the published inference
code, e.g. vLLM/SGLang's deepseek_mtp):

    h'_i = DecoderLayer(eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)]))      h_i: the main model's last hidden state
    logits_i = Head(shared_head.norm(h'_i))  predicts t_{i+2}                 (before its final norm)

Emb and Head are the main model's embedding and LM head (shared in DeepSeek's design; the checkpoint's copies
``embed_tokens`` / ``shared_head.head`` are not loaded and are exported unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from dsft.errors import ModelError
from dsft.model import fp8
from dsft.model.base_checkpoint import weight_map

SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # the main model's, not loaded from the MTP copy


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """The MTP module under its checkpoint names: the decoder layer's own modules plus enorm, hnorm, eh_proj and
    shared_head.norm (see module docstring)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = DeepseekV3RMSNorm(h, eps=eps)
        self.hnorm = DeepseekV3RMSNorm(h, eps=eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = DeepseekV3RMSNorm(h, eps=eps)

    def predict(self, h_prev: torch.Tensor, emb_next: torch.Tensor, **layer_kwargs: Any) -> torch.Tensor:
        """shared_head.norm(DecoderLayer(eh_proj([enorm(emb_next) ; hnorm(h_prev)]))); LM head not applied."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        x = self(x, **layer_kwargs)  # the decoder layer's forward (gradient checkpointing applies)
        return self.shared_head.norm(x)


def mtp_layer(model) -> DeepseekV3MTPLayer | None:
    """The attached MTP layer of a (possibly wrapped) causal LM, or None."""
    return next((m for m in model.modules() if isinstance(m, DeepseekV3MTPLayer)), None)


def attach_mtp(model, model_dir: str | Path, ckpt: dict[str, Any]) -> DeepseekV3MTPLayer:
    """Load the folder's MTP layer (FP8 linears kept e4m3) and append it to model.model.layers; returns it."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    from dsft.model.fp8_load import install_tensor, swap_fp8_modules

    model_dir = Path(model_dir)
    cfg = model.config
    if cfg.model_type != "deepseek_v3":
        raise ModelError(f"{model_dir}: the MTP loss is implemented for model_type deepseek_v3 (DeepSeek-V3/R1/V3.1), "
                         f"got '{cfg.model_type}'")
    idx = int(cfg.num_hidden_layers)
    prefix = f"model.layers.{idx}."
    if prefix not in (ckpt.get("mtp_prefixes") or []):
        raise ModelError(f"{model_dir}: no MTP layer {prefix}* in the checkpoint (num_nextn_predict_layers "
                         f"{ckpt.get('num_nextn_predict_layers', 0)})")
    if len(model.model.layers) != idx:
        raise ModelError(f"{model_dir}: the model already has {len(model.model.layers)} layers (MTP attached twice?)")
    dtype = model.model.embed_tokens.weight.dtype
    with init_empty_weights(include_buffers=False):
        layer = DeepseekV3MTPLayer(cfg, idx).to(dtype)
    model.model.layers.append(layer)
    wmap, _ = weight_map(model_dir)
    names = sorted(n for n in wmap if n.startswith(prefix) and not n.removeprefix(prefix).startswith(SHARED))
    scales = {n.removesuffix(fp8.SCALE_SUFFIX) for n in names if n.endswith(".weight" + fp8.SCALE_SUFFIX)}
    swap_fp8_modules(model, scales, tuple(ckpt.get("block") or fp8.BLOCK))
    by_shard: dict[str, list[str]] = {}
    for n in names:
        by_shard.setdefault(wmap[n], []).append(n)
    for shard, group in sorted(by_shard.items()):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for n in group:
                install_tensor(model, n, f.get_tensor(n))
    missing = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if missing:
        raise ModelError(f"{model_dir}: {len(missing)} MTP tensor(s) missing from the checkpoint, e.g. {prefix}{missing[0]}")
    device = model.model.embed_tokens.weight.device
    return layer.to(device)


def mtp_targets(targets: torch.Tensor, sample_index: torch.Tensor, ignore: int) -> torch.Tensor:
    """Labels of the MTP head: position i predicts t_{i+2} = the main target of position i+1, only while i+1 is in
    the same sample (packed rows; row and sample ends are masked) and that target is a label (assistant token)."""
    out = torch.full_like(targets, ignore)
    same = (sample_index[:, 1:] == sample_index[:, :-1]) & (sample_index[:, :-1] >= 0)
    out[:, :-1] = torch.where(same, targets[:, 1:], torch.full_like(targets[:, 1:], ignore))
    return out


def mtp_hidden(model, layer: DeepseekV3MTPLayer, h_prev: torch.Tensor, input_ids: torch.Tensor,
               position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The MTP block's normed hidden states (B, L, H) for every position (position i uses h_prev_i and token i+1;
    the last position's next token is a wrapped-around id whose output the caller masks). Same causal / packed
    mask and rotary embedding as the main decoder builds from these position ids."""
    from transformers.masking_utils import create_causal_mask

    dec = model.model
    emb = dec.embed_tokens(torch.roll(input_ids, -1, dims=1))
    mask = create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=attention_mask, cache=None,
                              position_ids=position_ids)
    pos_emb = dec.rotary_emb(emb, position_ids)
    return layer.predict(h_prev, emb, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb)
