"""The planner on checkpoints as DeepSeek ships them: FP8 128×128-block linears, the MTP layer, a sharded index."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsft.errors import ConfigError
from dsft.plan import PlanRequest, estimate, make_plan, parse_gpu, resolve_arch
from dsft.plan.checkpoint import checkpoint_bytes
from dsft.plan.estimate import dequant_temporaries

ROOT = Path(__file__).resolve().parents[2]
BYTES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
# a tiny DeepSeek-V3 shape: hidden 320 and kv_lora_rank 160 are not multiples of 128 (edge blocks), 1 dense + 2 MoE
TINY = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 1000, "hidden_size": 320,
        "intermediate_size": 640, "moe_intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "q_lora_rank": 192, "kv_lora_rank": 160, "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32, "v_head_dim": 64, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}}


def _fp8(name: str, out: int, inp: int) -> dict[str, tuple[str, list[int]]]:
    """An FP8 weight and its float32 scale_inv: one scale per 128×128 block, edge blocks padded."""
    return {f"{name}.weight": ("F8_E4M3", [out, inp]),
            f"{name}.weight_scale_inv": ("F32", [math.ceil(out / 128), math.ceil(inp / 128)])}


def _layer(c: dict, i: int, moe: bool) -> dict[str, tuple[str, list[int]]]:
    h, p = c["hidden_size"], f"model.layers.{i}"
    qk, heads = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["num_attention_heads"]
    t = {f"{p}.input_layernorm.weight": ("BF16", [h]), f"{p}.post_attention_layernorm.weight": ("BF16", [h]),
         f"{p}.self_attn.q_a_layernorm.weight": ("BF16", [c["q_lora_rank"]]),
         f"{p}.self_attn.kv_a_layernorm.weight": ("BF16", [c["kv_lora_rank"]])}
    t |= _fp8(f"{p}.self_attn.q_a_proj", c["q_lora_rank"], h)
    t |= _fp8(f"{p}.self_attn.q_b_proj", heads * qk, c["q_lora_rank"])
    t |= _fp8(f"{p}.self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
    t |= _fp8(f"{p}.self_attn.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
    t |= _fp8(f"{p}.self_attn.o_proj", h, heads * c["v_head_dim"])
    if not moe:
        w = c["intermediate_size"]
        return t | _fp8(f"{p}.mlp.gate_proj", w, h) | _fp8(f"{p}.mlp.up_proj", w, h) | _fp8(f"{p}.mlp.down_proj", h, w)
    mi, e = c["moe_intermediate_size"], c["n_routed_experts"]
    t |= {f"{p}.mlp.gate.weight": ("BF16", [e, h]), f"{p}.mlp.gate.e_score_correction_bias": ("F32", [e])}
    for x in range(e):  # one tensor per expert, as shipped
        q = f"{p}.mlp.experts.{x}"
        t |= _fp8(f"{q}.gate_proj", mi, h) | _fp8(f"{q}.up_proj", mi, h) | _fp8(f"{q}.down_proj", h, mi)
    w = mi * c["n_shared_experts"]
    q = f"{p}.mlp.shared_experts"
    return t | _fp8(f"{q}.gate_proj", w, h) | _fp8(f"{q}.up_proj", w, h) | _fp8(f"{q}.down_proj", h, w)


def shipped_tensors(c: dict) -> dict[str, tuple[str, list[int]]]:
    """Every tensor name, dtype and shape of a DeepSeek-V3-layout checkpoint (MTP as layer num_hidden_layers)."""
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    t = {"model.embed_tokens.weight": ("BF16", [v, h]), "lm_head.weight": ("BF16", [v, h]),
         "model.norm.weight": ("BF16", [h])}
    for i in range(n):
        t |= _layer(c, i, moe=i >= c["first_k_dense_replace"])
    for m in range(c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{n + m}"
        t |= _layer(c, n + m, moe=True)
        t |= {f"{p}.enorm.weight": ("BF16", [h]), f"{p}.hnorm.weight": ("BF16", [h]),
              f"{p}.eh_proj.weight": ("BF16", [h, 2 * h]), f"{p}.shared_head.norm.weight": ("BF16", [h]),
              f"{p}.shared_head.head.weight": ("BF16", [v, h]), f"{p}.embed_tokens.weight": ("BF16", [v, h])}
    return t


def write_checkpoint(d: Path, config: dict, *, shards: int = 3, drop=lambda name: False) -> int:
    """config.json + model.safetensors.index.json (tensors spread over `shards` files); returns the true byte total."""
    tensors = {k: v for k, v in shipped_tensors(config).items() if not drop(k)}
    total = sum(BYTES[dt] * math.prod(shape) for dt, shape in tensors.values())
    names = sorted(tensors)
    wmap = {k: f"model-{1 + i * shards // len(names):05d}-of-{shards:05d}.safetensors" for i, k in enumerate(names)}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    return total


def test_checkpoint_bytes_equal_the_shipped_layout(tmp_path):
    total = write_checkpoint(tmp_path / "v3", TINY)
    arch = resolve_arch(str(tmp_path / "v3"))
    assert arch.fp8_block == (128, 128) and arch.mtp_layers == 1 and arch.dtype == "bfloat16"
    assert checkpoint_bytes(arch) == total  # FP8 + scales + BF16 + fp32 router bias, MTP layer included, to the byte
    info = arch.extra["checkpoint"]
    assert info["shards"] == 3 and info["mtp_layers_stored"] == 1 and info["per_expert_tensors"] and not info["problems"]
    bf16 = dict(TINY, quantization_config=None)
    write_checkpoint(tmp_path / "bf16", bf16, drop=lambda k: k.endswith("weight_scale_inv"))
    assert checkpoint_bytes(resolve_arch(str(tmp_path / "bf16"))) < 2.1 * total


def test_fp8_base_stays_one_byte_per_param_under_lora(tmp_path):
    write_checkpoint(tmp_path / "v3", TINY)
    fp8 = resolve_arch(str(tmp_path / "v3"))
    req = PlanRequest(fp8, method="lora", gpu=parse_gpu("A100-80GB"), lora_targets="attention", micro_batch=2)
    bf16 = estimate(replace(req, arch=replace(fp8, fp8_block=None)))
    e = estimate(req)
    linears = sum(lin.params for i in range(fp8.layers) for lin in fp8.layer_linears(i)) + sum(
        fp8.n_routed_experts * fp8.expert_params() for i in range(fp8.layers) if fp8.is_moe_layer(i))
    assert bf16.weights - e.weights == pytest.approx(linears, rel=0.02)  # 2 → 1 byte (+ scales) per linear weight
    # dequantization temporaries: the largest FP8 module (the dense MLP, 640 × 320) as fp32 product + bf16 cast
    assert dequant_temporaries(req) == 640 * 320 * (4 + 2) and dequant_temporaries(replace(req, method="full")) == 0
    assert any("FP8 base" in n for n in e.notes)
    full = estimate(replace(req, method="full"))
    assert full.weights == estimate(replace(req, method="full", arch=replace(fp8, fp8_block=None))).weights
    assert any("dequantized" in n for n in full.notes)


def test_lora_on_fp8_routed_experts_is_per_expert_without_a_fused_copy(tmp_path):
    """dsft loads an FP8 base's routed experts one FP8 expert MLP each, so LoRA adapts every expert's gate/up/down as
    ordinary linears: r·(in + out) per projection, and no W + ΔW copy of the fused experts (which the BF16 copy of
    the same model, loaded fused by transformers, does keep). Measured against real steps in test_plan_accuracy."""
    write_checkpoint(tmp_path / "v3", TINY)
    fp8 = resolve_arch(str(tmp_path / "v3"))
    req = PlanRequest(fp8, method="lora", gpu=parse_gpu("A100-80GB"), micro_batch=2, lora_rank=8)
    attn = replace(req, lora_targets="attention")
    h, mi, r = 320, 192, 8
    per_expert = 3 * r * (h + mi)  # gate, up (h → mi) and down (mi → h), each its own LoRA
    assert estimate(req).trainable_params - estimate(attn).trainable_params == pytest.approx(
        2 * 4 * per_expert + 2 * r * (h + 640) + r * (640 + h) + 2 * (2 * r * (h + mi) + r * (mi + h)))
    assert not any("W+ΔW" in n for n in estimate(req).notes)
    bf16 = replace(req, arch=replace(fp8, fp8_block=None))
    # the per-layer fused copy the BF16 model keeps for backward is absent on the FP8 base
    from dsft.plan.activations import layer_bytes

    assert layer_bytes(bf16, 1, "lora")[2] == 4 * 3 * h * mi * 2 and layer_bytes(req, 1, "lora")[2] == 0


def test_index_disagreeing_with_config_is_a_note(tmp_path):
    write_checkpoint(tmp_path / "m", TINY, drop=lambda k: k.startswith("model.layers.3."))  # MTP deleted by hand
    plan = make_plan(PlanRequest(resolve_arch(str(tmp_path / "m")), gpu=parse_gpu("H100")), search=False)
    problems = plan.to_dict()["checkpoint"]["problems"]
    assert len(problems) == 1 and "num_nextn_predict_layers 1" in problems[0] and "planned with 0" in problems[0]
    assert plan.request.arch.mtp_layers == 0 and f"note: {problems[0]}" in plan.table()
    # a header that promises more than the tensors hold is named
    index = tmp_path / "m" / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["metadata"]["total_size"] *= 2
    index.write_text(json.dumps(raw))
    assert any("of tensors, the config implies" in p for p in resolve_arch(str(tmp_path / "m")).extra["checkpoint"]["problems"])


def test_a_transformers_save_has_no_mtp_even_if_config_says_so(tmp_path):
    """transformers keeps num_nextn_predict_layers: 1 in config.json but saves no MTP tensors (single file)."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(TINY, quantization_config=None, num_hidden_layers=1, first_k_dense_replace=0)
    tensors = {k: torch.zeros(shape, dtype=torch.bfloat16) for k, (dt, shape) in shipped_tensors(cfg).items()
               if not k.startswith("model.layers.1.") and dt != "F8_E4M3" and not k.endswith("scale_inv")}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    a = resolve_arch(str(tmp_path / "m"))
    assert a.mtp_layers == 0 and a.extra["checkpoint"]["shards"] == 1
    assert a.extra["checkpoint"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())


def test_bad_index_and_bad_block_are_one_line_errors(tmp_path):
    write_checkpoint(tmp_path / "m", TINY)
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(ConfigError, match="weight_map"):
        resolve_arch(str(tmp_path / "m"))
    bad = dict(TINY, quantization_config={"quant_method": "fp8", "weight_block_size": [128]})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"weight_block_size \[128\]"):
        resolve_arch(str(tmp_path / "b"))


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "DeepSeek-V3.1"])
def test_shipped_v3_family_is_planned_as_fp8_with_mtp(name):
    a = resolve_arch(name)
    assert a.fp8_block == (128, 128) and a.mtp_layers == 1
    assert a.mtp_params() == pytest.approx(14e9, rel=0.05)  # "685B = 671B main + 14B MTP" (DeepSeek-V3 README)
    assert checkpoint_bytes(a) == pytest.approx((671e9 + 14e9) * 1.0, rel=0.02)  # ≈ 1 byte per parameter


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", "plan", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_plans_a_checkpoint_folder_and_the_shipped_r1(tmp_path):
    write_checkpoint(tmp_path / "DeepSeek-tiny", TINY)
    r = _dsft(str(tmp_path / "DeepSeek-tiny"), "--method", "lora", "--gpu", "24GB")
    assert r.returncode == 0, r.stderr
    assert "checkpoint: FP8 e4m3 linears with 128×128-block float32 scales, 1 MTP layer" in r.stdout
    assert "3 shards" in r.stdout and "verdict: FITS" in r.stdout
    j = _dsft("--model", "deepseek-r1", "--method", "lora", "--lora-targets", "attention", "--json")
    assert j.returncode == 0, j.stderr
    d = json.loads(j.stdout)
    assert d["checkpoint"]["fp8_block"] == [128, 128] and d["checkpoint"]["mtp_layers"] == 1
    assert d["smallest_hardware"]["gpus"] > 1 and d["smallest_hardware"]["gpu"] == "A100-80GB"
    # the FP8 base halves the weights the planner holds against the BF16 copy users make with fp8_cast_bf16.py
    b = json.loads(_dsft("--model", "deepseek-v3-bf16", "--method", "lora", "--lora-targets", "attention", "--json").stdout)
    assert d["memory_bytes"]["weights"] < 0.55 * b["memory_bytes"]["weights"]
    assert d["smallest_hardware"]["gpus"] < b["smallest_hardware"]["gpus"]


def test_v32_checkpoint_with_the_indexer_is_planned_to_the_byte(tmp_path):
    """DeepSeek-V3.2 adds DeepSeek Sparse Attention's indexer to every layer (wq_b and wk FP8 + scales, weights_proj
    BF16, a LayerNorm): the planner counts it, and the bytes equal the tiny shipped V3.2 folder's, MTP included."""
    from dsft.model.info import read_safetensors_header
    from dsft.model.shipped import write_shipped

    d = write_shipped(tmp_path / "v3.2", shape="v3.2")
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    indexer = sum(size[e["dtype"]] * math.prod(e["shape"]) for f in d.glob("*.safetensors")
                  for k, e in read_safetensors_header(f).items() if ".indexer." in k)
    arch = resolve_arch(str(d))
    assert arch.index_heads == 8 and arch.index_head_dim == 64
    v3 = replace(arch, index_heads=0, index_head_dim=0)
    assert indexer > 0 and checkpoint_bytes(arch) - checkpoint_bytes(v3) == indexer  # 4 layers (MTP's too), to the byte
    lora = PlanRequest(arch, method="lora", gpu=parse_gpu("A100-80GB"))
    assert estimate(lora).trainable_params == estimate(replace(lora, arch=v3)).trainable_params  # never adapted


def test_builtin_v32_is_v3_plus_the_indexer():
    v32, v3 = resolve_arch("deepseek-v3.2-exp"), resolve_arch("deepseek-v3")
    assert (v32.index_heads, v32.index_head_dim) == (64, 128) and v32.fp8_block == (128, 128) and v32.mtp_layers == 1
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 7168 * 64 + 2 * 128  # wq_b, wk, weights_proj, k_norm
    assert v32.total_params() - v3.total_params() == 61 * per_layer
