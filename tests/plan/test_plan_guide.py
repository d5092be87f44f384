"""The seed guide in the plan: DeepSeek-7B/13B/34B classes and their hardware row, full fine-tuning rules, and
multi-GPU scaling over NVLink / PCIe / network."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsft.plan import PlanRequest, make_plan, parse_gpu, resolve_arch
from dsft.plan.guidance import full_ft_batch
from dsft.plan.plan import smallest_hardware
from dsft.plan.recommend import recommend
from dsft.plan.scaling import BUCKET, LINK_EFFICIENCY, link, scaling, traffic

ROOT = Path(__file__).resolve().parents[2]
A100_40, A100_80 = parse_gpu("A100-40GB"), parse_gpu("A100-80GB")


@pytest.mark.parametrize("alias,builtin,size_class,seed_hw", [
    ("DeepSeek-7B", "deepseek-llm-7b", "7B", "1 × A100-40GB"),
    ("deepseek-13b", "deepseek-13b", "13B", "2 × A100-40GB"),
    ("DEEPSEEK-34B", "deepseek-coder-33b", "34B+", "4 × A100-40GB"),
])
def test_guide_names_are_size_classes(alias, builtin, size_class, seed_hw):
    a = resolve_arch(alias)
    assert a == resolve_arch(builtin)
    assert recommend(a).size_class == size_class and recommend(a).hardware == seed_hw


def test_thirteen_b_class_is_llama_shape_at_13b_dims():
    a = resolve_arch("DeepSeek-13B")
    assert (a.family, a.hidden, a.layers, a.heads, a.intermediate, a.vocab) == ("llama", 5120, 40, 40, 13824, 102400)
    assert a.total_params() == pytest.approx(13.7e9, rel=0.01)


def test_seed_row_beside_the_estimate():
    plan = make_plan(PlanRequest(resolve_arch("DeepSeek-13B"), method="lora", gpu=A100_40, micro_batch=4))
    row = plan.seed_row
    assert row["seed"] == "2 × A100-40GB" and row["estimate"].startswith("1 × A100-40GB")  # LoRA in bf16 needs 1
    assert f"the guide's hardware table: seed: 2 × A100-40GB; estimate: {row['estimate']}" in plan.table()
    full_req = PlanRequest(resolve_arch("DeepSeek-13B"), method="full", gpu=parse_gpu("H100"))
    n, sharding, _ = smallest_hardware(full_req, A100_40)  # asked on the guide's GPU, not the H100 of the request
    assert n > 2 and make_plan(full_req).seed_row["estimate"].startswith(f"{n} × A100-40GB ({sharding})")
    tiny = {"model_type": "llama", "vocab_size": 500, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    assert make_plan(PlanRequest(_arch(tiny), gpu=A100_40)).seed_row is None  # no guide row below 7B


def _arch(cfg: dict):
    from dsft.plan.models import arch_from_hf_config

    return arch_from_hf_config(cfg)


@pytest.mark.parametrize("effective,max_micro,expect", [(16, 1, (1, 16)), (16, 4, (2, 8)), (4, 4, (1, 8)),
                                                        (64, 4, (4, 16)), (16, 0, (1, 16))])
def test_full_ft_batch_keeps_accumulation_at_least_8(effective, max_micro, expect):
    assert full_ft_batch(effective, max(max_micro, 1)) == expect


def test_full_finetuning_recommends_the_guides_rules():
    plan = make_plan(PlanRequest(resolve_arch("deepseek-llm-7b"), method="full", gpu=A100_80, seq_len=512))
    r = plan.to_dict()["recommended"]
    assert r["lora_rank"] is None and r["grad_accum"] >= 8 and r["adam_betas"] == [0.9, 0.95]
    assert r["precision"] == "amp-bf16" and r["master_weights"] == "fp32"
    m = r["memory"]
    n = resolve_arch("deepseek-llm-7b").total_params()
    # peak in the optimizer step: 4 + 4 + 8 bytes/param and dsft's 4-byte foreach temporary with fp32 masters,
    # 2 + 2 + 4 + 2 without; + 5 % allocator slack on the GPU
    assert m["with_fp32_masters"] - m["without_fp32_masters"] == pytest.approx(10 * n * 1.05, rel=0.01)
    line = next(x for x in plan.table().splitlines() if x.startswith("recommended"))
    assert "LoRA rank 64" not in line and line.endswith("no LoRA rank") and "AdamW β=(0.9, 0.95)" in line and "fp32 master weights" in line
    assert "with fp32 master weights" in plan.table() and "without (bf16" in plan.table()
    lora = make_plan(PlanRequest(resolve_arch("deepseek-llm-7b"), method="lora", gpu=A100_80), search=False)
    assert "LoRA rank 32" in lora.table() and "memory" not in lora.to_dict()["recommended"]


def _two(method: str, interconnect: str, **kw):
    sharding = "zero3" if method == "full" else "none"
    return PlanRequest(resolve_arch("deepseek-llm-7b"), method=method, gpu=A100_80, num_gpus=2, sharding=sharding,
                       micro_batch=4, seq_len=512, interconnect=interconnect, **kw)


@pytest.mark.parametrize("method,low,high", [("lora", 0.95, 1.0), ("full", 0.85, 0.99)])
def test_two_a100_nvlink_scale_sanely_and_slower_links_scale_worse(method, low, high):
    eff = {ic: scaling(_two(method, ic), None)["efficiency"] for ic in ("nvlink", "pcie", "network")}
    assert low < eff["nvlink"] <= high
    assert eff["nvlink"] > eff["pcie"] > eff["network"]
    if method == "full":
        assert 1.6 < 2 * eff["nvlink"] < 2.0  # the guide: "2 cards ≈ 1.8× throughput"
        assert eff["network"] < 0.8


def test_ring_all_reduce_formula():
    req = _two("lora", "pcie")
    lk = link("pcie", A100_80)
    t = traffic(req, lk)
    from dsft.plan.request import trainable_params

    b = trainable_params(req) * 4  # fp32 adapter gradients
    buckets = -(-b // BUCKET)
    expect = 2 * (2 - 1) * lk.latency * buckets + 2 * (2 - 1) / 2 * b / (32e9 * LINK_EFFICIENCY)
    assert t["per_step"] == pytest.approx(expect) and t["per_micro"] == 0 and t["bytes"] == b


def test_time_uses_the_efficiency_and_multi_node_crosses_the_network():
    req = _two("full", "nvlink")
    plan = make_plan(req, examples=1000, avg_tokens=512, search=False)
    one = make_plan(replace(req, num_gpus=1, sharding="none"), examples=1000, avg_tokens=512, search=False)
    assert plan.seconds_per_epoch == pytest.approx(one.seconds_per_epoch / (2 * plan.efficiency))
    assert "multi-GPU: 2 GPUs over NVLink" in plan.table() and "scaling efficiency" in plan.table()
    big = scaling(replace(req, num_gpus=16), None)
    assert "network between them" in big["interconnect"] and big["efficiency"] < plan.efficiency
    assert scaling(replace(req, num_gpus=1, sharding="none"), None) is None


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", "plan", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_interconnect_and_seed_row_in_json():
    r = _dsft("--model", "DeepSeek-13B", "--gpu", "A100-40GB", "--gpus", "2", "--interconnect", "pcie", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["seed_hardware"]["seed"] == "2 × A100-40GB" and d["setup"]["interconnect"] == "pcie"
    assert d["scaling"]["interconnect"] == "PCIe 4.0 x16" and 0 < d["throughput"]["scaling_efficiency"] < 1
    bad = _dsft("--model", "deepseek-llm-7b", "--gpu", "4090", "--interconnect", "nvlink")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no NVLink" in bad.stderr
