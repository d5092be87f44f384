"""Load a shipped FP8 DeepSeek-V3/R1 folder without a full-precision copy: FP8 linears stay e4m3, MTP stays on disk.

The model is built on the meta device (no weights allocated), every linear whose checkpoint weight is FP8 becomes an
`FP8Linear` and every MoE layer's routed experts an `FP8Experts`; then the shards are read one tensor at a time and
each tensor is installed as stored (FP8 + scales) or in the model dtype (embeddings, norms, LM head; the router in
float32). The MTP layer(s) (`model.layers.{num_hidden_layers}.*`) are never read: `base_checkpoint.py` records
where they are so the export can copy them back bitwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsft.errors import ModelError
from dsft.model import fp8
from dsft.model.base_checkpoint import weight_map
from dsft.model.fp8_linear import FP8Experts, FP8Linear

log = logging.getLogger(__name__)
FP8_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")  # DeepSeek-V3, R1, V3.1; V3.2 (+ the sparse-attention indexer)


def _skeleton(model_dir: Path, dtype: torch.dtype, attn_implementation: str):
    """The causal LM with every parameter on the meta device (buffers such as rotary frequencies real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in FP8_MODEL_TYPES:
        raise ModelError(f"{model_dir}: FP8 checkpoints load for model_type {', '.join(FP8_MODEL_TYPES)} "
                         f"(DeepSeek-V3/R1/V3.1/V3.2), got '{config.model_type}'")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def swap_fp8_modules(model, fp8_weights: set[str], block: tuple[int, int]) -> None:
    """nn.Linear → FP8Linear where the checkpoint stores FP8; fused experts → FP8Experts (one expert at a time)."""
    for name, mod in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if type(mod).__name__.endswith("Experts") and f"{name}.0.gate_proj.weight" in fp8_weights:
            n_experts, two_inter, hidden = mod.gate_up_proj.shape
            new = FP8Experts(n_experts, hidden, two_inter // 2, mod.act_fn, block=block)
            model.get_submodule(parent_name).register_module(leaf, new)
        elif isinstance(mod, nn.Linear) and f"{name}.weight" in fp8_weights:
            new = FP8Linear(mod.in_features, mod.out_features, block=block, compute_dtype=mod.weight.dtype)
            model.get_submodule(parent_name).register_module(leaf, new)


def install_tensor(model, name: str, tensor: torch.Tensor) -> None:
    """Put one stored tensor into the model: FP8 pairs as stored, everything else in its parameter's dtype."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        raise ModelError(f"checkpoint tensor {name}: no module {mod_name} in the model (config.json disagrees)") from None
    if isinstance(mod, FP8Linear):
        key = {"weight": "weight_fp8", "weight_scale_inv": "weight_scale_inv"}.get(attr)
        if key is None:
            raise ModelError(f"checkpoint tensor {name}: unexpected beside an FP8 weight")
        want = getattr(mod, key)
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ModelError(f"checkpoint tensor {name}: {tuple(tensor.shape)} {tensor.dtype}, expected "
                             f"{tuple(want.shape)} {want.dtype} (FP8 e4m3 weight + float32 per-block scales)")
        mod._buffers[key] = tensor
        return
    old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    if old is None:
        raise ModelError(f"checkpoint tensor {name}: the model has no such parameter")
    if tuple(tensor.shape) != tuple(old.shape):
        raise ModelError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, the model expects {tuple(old.shape)}")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = tensor.to(old.dtype)


def _missing(model) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.is_meta]
    return names + [n for n, b in model.named_buffers() if b.is_meta]


def load_fp8_model(model_dir: str | Path, ckpt: dict[str, Any], *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa"):
    """The model with FP8 linears kept e4m3 (see module docstring); the MTP layers stay on disk."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    block = tuple(ckpt.get("block") or fp8.BLOCK)
    wmap, _ = weight_map(model_dir)
    mtp = tuple(ckpt.get("mtp_prefixes") or ())
    scales = {n for n in wmap if n.endswith(".weight" + fp8.SCALE_SUFFIX)}
    fp8_weights = {n.removesuffix(fp8.SCALE_SUFFIX) for n in scales if not n.startswith(mtp or ("\0",))}
    if not fp8_weights:
        raise ModelError(f"{model_dir}: config.json declares FP8 but the weights have no weight_scale_inv tensors")
    model = _skeleton(model_dir, dtype, attn_implementation)
    swap_fp8_modules(model, fp8_weights, block)
    by_shard: dict[str, list[str]] = {}
    for name, shard in wmap.items():
        if not (mtp and name.startswith(mtp)):
            by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        try:
            with safe_open(str(model_dir / shard), framework="pt") as f:
                for name in names:
                    install_tensor(model, name, f.get_tensor(name))
        except (OSError, RuntimeError) as err:
            raise ModelError(f"{model_dir / shard}: cannot read ({type(err).__name__}: {str(err)[:200]})") from err
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = _missing(model)
    if missing:
        raise ModelError(f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}")
    model.config._name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()
