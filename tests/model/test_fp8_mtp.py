"""DeepSeek-V3's MTP layer loaded from a shipped FP8 folder: FP8 kept e4m3, forward equal to a plain-torch reference
built from the raw checkpoint tensors, MTP labels inside samples only, packed MTP loss equal to samples alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RotaryEmbedding,
)

from dsft.errors import ModelError
from dsft.model.base_checkpoint import read_base_checkpoint
from dsft.model.fp8_linear import FP8Experts, FP8Linear
from dsft.model.fp8_mtp import attach_mtp, mtp_hidden, mtp_layer, mtp_targets
from dsft.model.load import load_model
from dsft.model.shipped import write_shipped
from dsft.train.batching import collate_packed
from dsft.train.encode import IGNORE, Encoded
from dsft.train.loss import CausalLMLoss

IDS = torch.tensor([[0, 100, 2000, 30000, 5, 77, 900, 12, 128000, 4], [0, 9, 8, 7, 6, 5, 4, 3, 2, 1]])


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return write_shipped(tmp_path_factory.mktemp("fp8") / "v3")


@pytest.fixture(scope="module")
def mtp_model(fp8_dir):
    model = load_model(fp8_dir, dtype="float32")
    attach_mtp(model, fp8_dir, read_base_checkpoint(fp8_dir))
    return model


def _raw(folder: Path, keep) -> dict[str, torch.Tensor]:
    wmap = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(wmap.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if keep(k)})
    return out


def _dequant(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 weights × their 128×128 block scales in FP32; everything else cast to FP32 (plain torch, no dsft)."""
    out = {}
    for k, t in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = raw[k + "_scale_inv"]
            s = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            t = t.float() * s
        out[k] = t.float()
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_mtp_logits(folder: Path, config, h_prev: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits_i = Head(norm(Block(eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])))) from the raw tensors; Emb and Head
    are the main model's (DeepSeek shares them); the block is a plain FP32 transformers decoder layer."""
    pre = f"model.layers.{config.num_hidden_layers}."
    w = _dequant(_raw(folder, lambda k: k.startswith(pre) or k in ("model.embed_tokens.weight", "lm_head.weight")))
    block_state = {k.removeprefix(pre): v for k, v in w.items()
                   if k.startswith(pre) and k.removeprefix(pre).split(".")[0] in
                   ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}
    experts: dict[tuple[int, str], torch.Tensor] = {}
    for k in [k for k in block_state if re.match(r"mlp\.experts\.\d+\.", k)]:
        e, proj = re.match(r"mlp\.experts\.(\d+)\.(\w+)_proj\.weight", k).groups()
        experts[(int(e), proj)] = block_state.pop(k)
    n = 1 + max(e for e, _ in experts)
    block_state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([experts[(e, "gate")], experts[(e, "up")]])
                                                           for e in range(n)])
    block_state["mlp.experts.down_proj"] = torch.stack([experts[(e, "down")] for e in range(n)])
    block = DeepseekV3DecoderLayer(config, config.num_hidden_layers).float().eval()
    missing, unexpected = block.load_state_dict(block_state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    eps = config.rms_norm_eps
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # t_{i+1} at position i
    emb = w["model.embed_tokens.weight"][nxt]
    x = torch.cat([_rms(emb, w[pre + "enorm.weight"], eps), _rms(h_prev, w[pre + "hnorm.weight"], eps)], dim=-1)
    x = x @ w[pre + "eh_proj.weight"].t()
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    x = block(x, attention_mask=None, position_ids=pos, position_embeddings=DeepseekV3RotaryEmbedding(config)(x, pos))
    return _rms(x, w[pre + "shared_head.norm.weight"], eps) @ w["lm_head.weight"].t()


def _pre_norm_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    got = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _m, a: got.__setitem__("h", a[0]))
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return got["h"]


@torch.no_grad()
def test_mtp_forward_equals_a_plain_torch_reference_and_stays_fp8(fp8_dir, mtp_model):
    layer = mtp_layer(mtp_model)
    assert layer is mtp_model.model.layers[3] and len(mtp_model.model.layers) == 4
    assert isinstance(layer.eh_proj, FP8Linear) and isinstance(layer.self_attn.q_a_proj, FP8Linear)
    assert isinstance(layer.mlp.experts, FP8Experts) and layer.eh_proj.weight_fp8.dtype == torch.float8_e4m3fn
    names = {n for n, _ in mtp_model.named_modules()}
    assert {"model.layers.3.eh_proj", "model.layers.3.mlp.experts.0.gate_proj", "model.layers.3.shared_head.norm",
            "model.layers.3.self_attn.kv_b_proj"} <= names
    assert "model.layers.3.embed_tokens" not in names  # shared with the main model
    h = _pre_norm_hidden(mtp_model, IDS)
    pos = torch.arange(IDS.shape[1])[None].expand(2, -1)
    got = mtp_model.lm_head(mtp_hidden(mtp_model, layer, h, IDS, pos))
    want = reference_mtp_logits(fp8_dir, mtp_model.config, h, IDS)
    assert (got - want).abs().max() < 2e-5 * max(1.0, float(want.abs().max())), float((got - want).abs().max())
    # the concat order matters: swapping the halves gives other logits
    swapped = layer.eh_proj(torch.cat([layer.hnorm(h), layer.enorm(mtp_model.model.embed_tokens(IDS.roll(-1, 1)))], -1))
    assert not torch.allclose(swapped, layer.eh_proj(torch.cat(
        [layer.enorm(mtp_model.model.embed_tokens(IDS.roll(-1, 1))), layer.hnorm(h)], -1)))


@torch.no_grad()
def test_the_main_model_is_unchanged_by_the_attached_mtp_layer(fp8_dir, mtp_model):
    plain = load_model(fp8_dir, dtype="float32")
    assert torch.equal(plain(input_ids=IDS).logits, mtp_model(input_ids=IDS).logits)


def test_mtp_targets_stay_inside_samples():
    tg = torch.tensor([[10, 11, IGNORE, 20, 21, IGNORE, IGNORE]])
    si = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    # position i takes the main target of i+1 only when i+1 is in the same sample
    assert mtp_targets(tg, si, IGNORE).tolist() == [[11, IGNORE, IGNORE, 21, IGNORE, IGNORE, IGNORE]]


def _examples() -> list[Encoded]:
    a = [0, 100, 2000, 30000, 5, 77, 900, 12, 128000, 4, 55]
    b = [0, 9, 8, 7, 6, 5, 4, 3]
    return [Encoded(a, [IGNORE] * 3 + a[3:]), Encoded(b, [IGNORE] * 2 + b[2:])]


def test_packed_mtp_loss_equals_the_samples_alone(mtp_model):
    lm = CausalLMLoss(mtp_model, mtp_weight=1.0)
    exs = _examples()
    lm(collate_packed(exs, 64, 1))  # grad enabled: the MTP term is part of the training objective
    packed = lm.pop_mtp()
    alone = [(lm(collate_packed([e], 64, 1)), lm.pop_mtp())[1] for e in exs]
    assert packed[2] == sum(n for *_, n in alone) == sum(e.n_labels for e in exs)
    assert abs(packed[1] - sum(a[1] for a in alone)) < 1e-4 * packed[1], (packed, alone)
    with torch.no_grad():  # evaluation: LM loss only, nothing accumulated
        lm(collate_packed(exs, 64, 1))
    assert lm.pop_mtp() == (0.0, 0.0, 0)


def test_attach_refuses_a_folder_without_mtp(tmp_path):
    folder = write_shipped(tmp_path / "nomtp", mtp=False)
    model = load_model(folder, dtype="float32")
    with pytest.raises(ModelError, match="no MTP layer model.layers.3"):
        attach_mtp(model, folder, read_base_checkpoint(folder))


@torch.no_grad()
def test_an_adapter_with_mtp_lora_loads_for_eval_and_serve_without_the_mtp_layer(tmp_path, fp8_dir):
    """eval/serve load the base without its MTP layer: the adapter's MTP LoRA is left out, the main logits agree."""
    from dsft.config import config_from_dict
    from dsft.model.adapters import attach_lora, load_adapter, save_adapter

    trained = load_model(fp8_dir, dtype="float32")
    attach_mtp(trained, fp8_dir, read_base_checkpoint(fp8_dir))
    pm, _ = attach_lora(trained, config_from_dict({"run_dir": str(tmp_path)}).lora, r=4, alpha=8)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.normal_(std=0.02)
    save_adapter(pm, tmp_path / "ad")
    assert any(".layers.3.eh_proj.lora_B" in k for k in load_file(str(tmp_path / "ad/adapter_model.safetensors")))
    served = load_adapter(load_model(fp8_dir, dtype="float32"), tmp_path / "ad").eval()
    pm.eval()
    assert mtp_layer(served) is None
    assert torch.equal(served(input_ids=IDS).logits, pm(input_ids=IDS).logits)


def test_mtp_gradients_are_the_same_with_gradient_checkpointing(tmp_path, fp8_dir):
    from dsft.config import config_from_dict
    from dsft.model.adapters import attach_lora
    from dsft.train.setup import enable_checkpointing

    model = load_model(fp8_dir, dtype="float32")
    attach_mtp(model, fp8_dir, read_base_checkpoint(fp8_dir))
    lora = config_from_dict({"run_dir": str(tmp_path), "lora": {"dropout": 0.0}}).lora
    pm, _ = attach_lora(model, lora, r=4, alpha=8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    pm.train()
    batch = collate_packed(_examples(), 64, 1)

    def grads() -> dict[str, torch.Tensor]:
        pm.zero_grad(set_to_none=True)
        CausalLMLoss(pm, mtp_weight=0.3)(batch).backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if ".layers.3." in n and p.grad is not None}

    plain = grads()
    enable_checkpointing(pm)
    assert mtp_layer(pm).gradient_checkpointing
    ckpt = grads()
    assert plain and plain.keys() == ckpt.keys()
    assert any(".layers.3.eh_proj.lora_A" in n for n in plain)
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-4) for n in plain)
