"""The planner sizes DPO / ORPO / SimPO (pairs ×2, the reference) and GRPO (G rollouts, the rollout KV cache, the
reference with beta > 0), from a config and from the CLI, and its estimates match measured CPU steps (±10 %)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from objective_measure import ObjSpec, compare, measure_in_subprocess, plan_request

from dsft.config import config_from_dict
from dsft.plan import (
    PlanRequest,
    estimate,
    make_plan,
    parse_gpu,
    plan_for_config,
    request_from_config,
    resolve_arch,
)
from dsft.plan.activations import kv_bytes_per_token, rollout_kv_cache
from dsft.plan.models import arch_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE_PCT = 10.0  # tests/plan/test_plan_accuracy.py's


def _req(**kw) -> PlanRequest:
    base = dict(arch=resolve_arch("deepseek-llm-7b"), seq_len=1024, micro_batch=2, gpu=parse_gpu("H100"))
    return PlanRequest(**{**base, **kw})


# ---- (a) pairs ×2 and the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_plans_two_sequences_per_pair_and_the_reference(method):
    sft, dpo = estimate(_req(method=method)), estimate(_req(method=method, objective="dpo"))
    assert dpo.peak > sft.peak
    assert _req(objective="dpo").sequences == 4 and _req(objective="dpo").tokens == 2 * _req().tokens
    b = dpo.breakdown()
    assert {"reference_model", "reference_forward"} <= b.keys() and "rollout_kv_cache" not in b
    assert dpo.objective_terms["reference_forward"] > 0
    # the activations of the forward/backward are those of the SFT step with twice the micro-batch (no dropout:
    # dsft's preference step turns dropout off)
    twice = estimate(_req(method=method, micro_batch=4, lora_dropout=0.0))
    dpo_train = estimate(_req(method=method, objective="orpo"))
    assert dpo_train.peak == pytest.approx(twice.peak, rel=0.02)


def test_orpo_and_simpo_have_no_reference():
    for obj in ("orpo", "simpo"):
        for method in ("lora", "full"):
            e = estimate(_req(method=method, objective=obj))
            assert e.reference == 0 and e.reference_forward == 0
            assert "reference_model" not in e.breakdown() and "reference_forward" not in e.breakdown()
            assert e.peak > estimate(_req(method=method)).peak
    text = make_plan(_req(objective="simpo"), search=False).table()
    assert "pairs ×2" in text and "no reference model" in text and "reference model " not in text


def test_full_dpo_adds_a_frozen_copy_of_the_weights():
    a = resolve_arch("deepseek-llm-7b")
    lora = estimate(_req(objective="dpo"))
    assert lora.reference == 0  # the base with adapters disabled: no second copy
    full = estimate(_req(method="full", objective="dpo"))
    assert full.reference == a.total_params() * 2 == full.weights  # bf16 compute dtype: 2 bytes per weight
    assert full.allocated >= full.weights + full.reference + full.optimizer
    # the copy is the model as held: fp32 under mixed precision with fp32 master weights
    amp = estimate(_req(method="full", objective="dpo", precision="amp-bf16"))
    assert amp.reference == a.total_params() * 4
    # freeze also copies the whole model; GRPO only with beta > 0
    assert estimate(_req(method="freeze", objective="dpo")).reference == a.total_params() * 2
    assert estimate(_req(method="full", objective="grpo", seq_len=1024, max_completion_length=512)).reference == 0
    assert estimate(_req(method="full", objective="grpo", seq_len=1024, max_completion_length=512,
                         beta=0.04)).reference == a.total_params() * 2
    text = make_plan(_req(method="full", objective="dpo"), search=False).table()
    assert "reference model" in text and "frozen copy of the model" in text and "reference forward" in text


# ---- (b) the rollout KV cache -----------------------------------------------------------------------------------
def _tiny_v3():
    return arch_from_hf_config(dict(
        model_type="deepseek_v3", vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32))


def _tiny_llama():
    return arch_from_hf_config(dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=352,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("arch,per_token", [
    # transformers 5 caches DeepSeek's compressed latent: kv_lora_rank + qk_rope_head_dim per token and layer
    (_tiny_v3, 32 + 16),
    # Llama caches K and V per KV head: 2 × 2 heads × 32 dims
    (_tiny_llama, 2 * 2 * 32),
])
@pytest.mark.parametrize("precision,nbytes", [("bf16", 2), ("fp32", 4), ("amp-bf16", 4)])
def test_rollout_kv_cache_is_layers_x_g_x_length_x_per_token(arch, per_token, precision, nbytes):
    a = arch()
    req = PlanRequest(arch=a, objective="grpo", seq_len=300, num_generations=6, max_completion_length=200,
                      prompt_length=64, precision=precision, gpu=parse_gpu("H100"), micro_batch=3)
    assert kv_bytes_per_token(req) == per_token * nbytes
    # a micro-batch of 3 prompts decoded together, each prompt's cache repeated for its G = 6 rows
    hand = a.layers * 3 * 6 * (64 + 200) * per_token * nbytes
    assert rollout_kv_cache(req) == hand
    e = estimate(req)
    assert e.objective_terms["rollout_kv_cache"] == hand
    assert {"rollout_kv_cache", "rollout_work"} <= e.breakdown().keys()
    assert req.sequences == 18 and req.tokens == 18 * 264  # the train forward: micro-batch × G rollouts


def test_rollout_kv_cache_of_the_builtin_models():
    v3 = resolve_arch("deepseek-v3")
    req = PlanRequest(arch=v3, objective="grpo", seq_len=2048, max_completion_length=1024, gpu=parse_gpu("H200"))
    assert rollout_kv_cache(req) == 61 * 8 * 2048 * (512 + 64) * 2
    llm = resolve_arch("deepseek-llm-7b")
    req = replace(req, arch=llm)
    assert rollout_kv_cache(req) == 30 * 8 * 2048 * 2 * 32 * 128 * 2


def test_grpo_peak_can_be_the_generation():
    """With checkpointing the train step saves one hidden state per layer; the cache of a wide-KV model is larger."""
    a = arch_from_hf_config(dict(model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=352,
                                 num_hidden_layers=8, num_attention_heads=4, head_dim=128))
    req = PlanRequest(arch=a, objective="grpo", seq_len=128, max_completion_length=96, micro_batch=1,
                      gradient_checkpointing=True, precision="fp32")
    e = estimate(req)
    assert e.phase == "rollout generation (decode)" and e.kv_cache == rollout_kv_cache(req) > 0
    assert e.activations == e.gradients == 0 and e.rollout_work > 0


def test_grpo_validation_and_defaults():
    with pytest.raises(Exception, match="max-completion-length 1024: expected at most seq-len 512"):
        estimate(PlanRequest(arch=_tiny_llama(), objective="grpo"))
    with pytest.raises(Exception, match="num-generations 1"):
        estimate(PlanRequest(arch=_tiny_llama(), objective="grpo", num_generations=1, seq_len=2048))
    with pytest.raises(Exception, match="prompt-length 900: expected at most 24"):
        estimate(PlanRequest(arch=_tiny_llama(), objective="grpo", seq_len=1048, prompt_length=900))
    with pytest.raises(Exception, match="objective 'ppo'"):
        estimate(PlanRequest(arch=_tiny_llama(), objective="ppo"))
    with pytest.raises(Exception, match="trainer 'hf'"):
        estimate(PlanRequest(arch=_tiny_llama(), objective="dpo", trainer="hf"))
    req = PlanRequest(arch=_tiny_llama(), objective="grpo", seq_len=1536)
    assert req.rollout_prompt == 512 and req.rollout_len == 1536


# ---- time --------------------------------------------------------------------------------------------------------
def test_time_counts_both_sequences_the_reference_and_generation():
    sft = make_plan(_req(), examples=1000, avg_tokens=400, search=False)
    simpo = make_plan(_req(objective="simpo"), examples=1000, avg_tokens=400, search=False)
    dpo = make_plan(_req(objective="dpo"), examples=1000, avg_tokens=400, search=False)
    assert simpo.tokens_per_epoch == 2 * sft.tokens_per_epoch and simpo.tokens_per_step == 2 * sft.tokens_per_step
    assert simpo.seconds_per_epoch == pytest.approx(2 * sft.seconds_per_epoch)
    assert dpo.seconds_per_epoch > 1.2 * simpo.seconds_per_epoch  # + the reference's forward
    g = make_plan(_req(objective="grpo", max_completion_length=512), examples=100, avg_tokens=200, search=False)
    t = g.throughput()
    assert g.tokens_per_epoch == 100 * 8 * (200 + 512)
    assert t["generation_seconds_per_prompt"] > 0 and t["hbm_gb_s"] == 3350.0
    # 512 decode steps, each at least the weights streamed once at 70 % of 3.35 TB/s
    assert t["generation_seconds_per_prompt"] > 512 * g.request.arch.total_params() * 2 / (0.7 * 3350e9)
    train_only = g.tokens_per_epoch * t["flops_per_token"] / (989e12 * 0.35)
    assert g.seconds_per_epoch == pytest.approx(train_only + 100 * t["generation_seconds_per_prompt"])


# ---- (c) from a dsft config ----------------------------------------------------------------------------------
def test_request_from_config_reads_objective_and_grpo_section():
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-7b"}, "data": {"max_seq_length": 1024},
                            "train": {"objective": "grpo", "per_device_train_batch_size": 2},
                            "grpo": {"num_generations": 6, "max_completion_length": 384, "beta": 0.04},
                            "plan": {"gpu": "H100"}})
    req = request_from_config(cfg)
    assert (req.objective, req.num_generations, req.max_completion_length, req.beta) == ("grpo", 6, 384, 0.04)
    assert req.rollout_prompt == 640 and req.sequences == 12
    plan = plan_for_config(cfg, search=False)
    assert plan.to_dict()["objective"]["rollout"]["num_generations"] == 6
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-7b"},
                            "train": {"objective": "dpo", "method": "full", "per_device_train_batch_size": 1},
                            "plan": {"gpu": "H200"}})
    req = request_from_config(cfg)
    assert req.objective == "dpo" and req.reference_copy and req.dropout == 0.0


def test_plan_training_prints_the_objective_terms():
    from dsft.plan import plan_training

    said: list[str] = []
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-7b"}, "data": {"max_seq_length": 1024},
                            "train": {"objective": "grpo", "per_device_train_batch_size": "auto",
                                      "gradient_checkpointing": True},
                            "grpo": {"num_generations": 8, "max_completion_length": 512},
                            "plan": {"gpu": "A100-80GB", "effective_batch_size": 16}})
    micro, accum, plan = plan_training(cfg, echo=said.append)
    assert micro * accum == 16 and plan.request.objective == "grpo"
    assert "rollout KV cache" in said[0] and "objective: grpo" in said[0]


# ---- (d) the CLI -----------------------------------------------------------------------------------------------
def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", "plan", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_grpo_json_has_the_terms():
    r = _dsft("--model", "deepseek-llm-7b", "--objective", "grpo", "--num-generations", "8",
              "--max-completion-length", "512", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["setup"]["objective"] == "grpo" and d["setup"]["seq_len"] == 512 + 512
    assert {"rollout_kv_cache", "rollout_work"} <= d["memory_bytes"].keys()
    o = d["objective"]
    assert o["rollout"]["num_generations"] == 8 and o["rollout"]["max_completion_length"] == 512
    assert o["rollout_kv_cache_bytes"] == 30 * 8 * 1024 * 2 * 4096 * 2 and o["sequences_per_micro_batch"] == 8
    assert o["reference"] is None and d["throughput"]["generation_seconds_per_prompt"] > 0
    assert sum(v for k, v in d["memory_bytes"].items() if k not in ("allocated", "peak", "pageable")) == \
        pytest.approx(d["memory_bytes"]["peak"], abs=16)


def test_cli_dpo_text_names_the_terms(tmp_path):
    r = _dsft("--model", "deepseek-llm-7b", "--method", "full", "--objective", "dpo", "--gpu", "H200")
    assert r.returncode == 0, r.stderr
    for word in ("objective: dpo", "pairs ×2", "reference model", "reference forward", "activations (pairs ×2)"):
        assert word in r.stdout
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: deepseek-llm-7b}\ntrain: {objective: simpo, per_device_train_batch_size: 2}\n"
                 "data: {max_seq_length: 1024}\nplan: {gpu: H100}\n")
    r = _dsft(str(p), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["objective"]["name"] == "simpo" and d["objective"]["sequences_per_micro_batch"] == 4
    assert d["objective"]["reference"] is None and "reference_model" not in d["memory_bytes"]


@pytest.mark.parametrize("args,expect", [
    (["--objective", "ppo"], "objective 'ppo': expected one of sft, dpo"),
    (["--objective", "grpo", "--num-generations", "1"], "--num-generations 1: expected an integer ≥ 2"),
    (["--objective", "grpo", "--max-completion-length", "0"], "--max-completion-length 0: expected a positive"),
    (["--objective", "grpo", "--seq-len", "512", "--max-completion-length", "512"], "at most seq-len 512"),
    (["--objective", "grpo", "--beta", "-1"], "--beta -1.0: expected a number ≥ 0"),
    (["--objective", "dpo", "--trainer", "hf"], "trainer 'hf': expected dsft"),
])
def test_cli_bad_objective_values_are_one_line_exit_2(args, expect):
    r = _dsft("--model", "deepseek-llm-7b", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsft: error:") and expect in lines[0], r.stderr


# ---- (e) against measured steps -------------------------------------------------------------------------------
_GEN_PEAK = {"num_hidden_layers": 8, "head_dim": 128, "vocab_size": 128}  # a wide KV cache: generation peaks


def objective_specs() -> list[ObjSpec]:
    """DPO (LoRA: reference = adapters off; full: a frozen copy), SimPO, GRPO with a reference copy, GRPO whose
    peak is the rollout's decode, DPO on a DeepSeek-V3 (MLA + MoE); the peaks land in different phases."""
    return [
        ObjSpec("dpo"),
        ObjSpec("dpo", method="full"),
        ObjSpec("simpo"),
        ObjSpec("grpo", method="full", beta=0.1),
        ObjSpec("grpo", gc=True, batch=1, num_generations=8, max_completion_length=96, shape=_GEN_PEAK),
        ObjSpec("dpo", arch="deepseek_v3"),
    ]


@pytest.fixture(scope="module")
def rows():
    specs = objective_specs()
    results = measure_in_subprocess(specs, timeout=600)  # ≈ 50 s on an idle 2-core CPU
    assert len(results) == len(specs)
    return [compare(spec, res["measured"]) for spec, res in zip(specs, results, strict=True)]


def test_objective_estimates_within_ten_percent_of_measured(rows):
    bad = [f"{r['config']}: estimated {r['estimated']}, measured {r['measured']} ({r['error_pct']:+.1f} %)"
           for r in rows if abs(r["error_pct"]) > TOLERANCE_PCT]
    assert not bad, "; ".join(bad)
    phases = {r["phase"].split(" (layer")[0] for r in rows}
    assert {"reference forward (loss)", "rollout generation (decode)", "backward (loss)"} <= phases, phases


def test_the_objective_check_can_fail(rows):
    """Planning each measured step as SFT at the same micro-batch (what the planner did before) misses by > 10 %."""
    for spec, row in zip(objective_specs(), rows, strict=True):
        as_sft = estimate(replace(plan_request(spec), objective="sft")).allocated
        assert abs(as_sft - row["measured"]) / row["measured"] > TOLERANCE_PCT / 100, row["config"]
