"""The planner: exact parameter counts, published memory figures, batch fitting, the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsft.config import config_from_dict
from dsft.plan import (
    PlanRequest,
    auto_micro_batch,
    estimate,
    fit_micro_batch,
    parse_gpu,
    plan_for_config,
    resolve_arch,
)
from dsft.plan.models import arch_from_hf_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,total,active", [
    ("deepseek-v3", 671e9, 37e9), ("deepseek-v2-lite", 15.7e9, 2.4e9), ("deepseek-v2", 236e9, 21e9),
    ("deepseek-llm-7b", 6.9e9, None), ("deepseek-llm-67b", 67e9, None), ("deepseek-coder-33b", 33.3e9, None),
    ("r1-distill-qwen-7b", 7.6e9, None), ("r1-distill-llama-8b", 8.0e9, None), ("r1-distill-llama-70b", 70.6e9, None),
    ("r1-distill-qwen-1.5b", 1.78e9, None), ("r1-distill-qwen-32b", 32.8e9, None),
])
def test_published_parameter_counts(name, total, active):
    a = resolve_arch(name)
    assert a.total_params() == pytest.approx(total, rel=0.02)
    if active:
        assert a.active_params() == pytest.approx(active, rel=0.05)


def _tiny_models():
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config

    yield DeepseekV2Config(vocab_size=500, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                           kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)

    yield LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    yield Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    from dsft.model.tiny import TINY_V3_KWARGS

    yield DeepseekV3Config(vocab_size=500, **TINY_V3_KWARGS)


def test_param_count_equals_real_transformers_models():
    from transformers import AutoModelForCausalLM

    for hf_cfg in _tiny_models():
        model = AutoModelForCausalLM.from_config(hf_cfg)
        real = sum(p.numel() for p in model.parameters())
        assert resolve_arch_from(hf_cfg).total_params() == real, hf_cfg.model_type


def resolve_arch_from(hf_cfg):
    return arch_from_hf_config(hf_cfg.to_dict(), name=hf_cfg.model_type)


def test_local_config_json_matches_builtin(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_arch(str(tmp_path)).total_params() == resolve_arch("deepseek-llm-7b").total_params()


def test_seven_b_matches_published_figures():
    a100 = parse_gpu("A100-40GB")
    arch = resolve_arch("deepseek-llm-7b")
    lora = estimate(PlanRequest(arch, method="lora", seq_len=512, micro_batch=1, gpu=a100))
    fixed = lora.weights + lora.adapter + lora.optimizer + lora.overhead
    assert 13 * 1e9 < fixed < 17.5 * 1e9  # "LoRA on a 7B model in 16-bit needs roughly 16 GB plus activations"
    full = estimate(PlanRequest(arch, method="full", precision="amp-bf16", seq_len=512, micro_batch=1, gpu=a100,
                                trainer="hf"))
    assert 105e9 < full.peak < 135e9  # "full AMP fine-tuning roughly 120 GB" (HF Trainer, fused AdamW)
    dsft_full = estimate(PlanRequest(arch, method="full", precision="amp-bf16", seq_len=512, micro_batch=1, gpu=a100))
    assert dsft_full.optimizer - full.optimizer == pytest.approx(4 * arch.total_params(), rel=0.01)  # foreach temp
    qlora = estimate(PlanRequest(arch, method="qlora", seq_len=512, micro_batch=1, gpu=a100))
    assert qlora.weights < 0.5 * lora.weights  # NF4 linears; embeddings and head upcast to fp32


def test_memory_grows_with_batch_and_checkpointing_saves_activations():
    req = PlanRequest(resolve_arch("r1-distill-qwen-7b"), seq_len=1024, micro_batch=2, gpu=parse_gpu("H100"))
    e1, e4 = estimate(req), estimate(replace(req, micro_batch=4))
    assert e4.peak > e1.peak and e4.activations > 1.8 * e1.activations
    gc = estimate(replace(req, micro_batch=4, gradient_checkpointing=True))
    assert gc.activations < 0.5 * e4.activations


def test_zero3_shards_weights_and_offload_drops_optimizer():
    req = PlanRequest(resolve_arch("deepseek-coder-33b"), method="full", precision="bf16", gpu=parse_gpu("A100-80GB"))
    one = estimate(req)
    eight = estimate(replace(req, num_gpus=8, sharding="zero3"))
    assert eight.weights < one.weights / 4 and eight.optimizer == pytest.approx(one.optimizer / 8)
    off = estimate(replace(req, num_gpus=8, sharding="zero3", cpu_offload=True))
    assert off.optimizer == 0


def test_fit_micro_batch_is_the_boundary():
    req = PlanRequest(resolve_arch("deepseek-llm-7b"), seq_len=2048, gpu=parse_gpu("80GB"))
    mb = fit_micro_batch(req)
    assert mb >= 1
    assert estimate(replace(req, micro_batch=mb)).peak <= req.gpu.memory_bytes
    assert estimate(replace(req, micro_batch=mb + 1)).peak > req.gpu.memory_bytes
    assert fit_micro_batch(PlanRequest(resolve_arch("deepseek-v3"), gpu=parse_gpu("4090"))) == 0


def test_auto_micro_batch_keeps_the_effective_batch():
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-7b"}, "data": {"max_seq_length": 2048},
                            "train": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
                            "plan": {"gpu": "A100-40GB"}})
    mb, accum = auto_micro_batch(cfg)
    assert mb * accum == 32 and mb < 16
    cfg.train.per_device_train_batch_size = "auto"
    mb, accum = auto_micro_batch(cfg)
    assert mb * accum == 16 * 2  # the seed's batch 16 for a 7B model, times the configured accumulation
    plan = plan_for_config(cfg)
    assert plan.fits and plan.request.micro_batch == mb
    assert "verdict: FITS" in plan.table()


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", "plan", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_acceptance_example_and_json():
    r = _dsft("--model", "deepseek-llm-7b", "--method", "lora", "--seq-len", "512", "--batch", "16", "--gpu", "A100-40GB")
    assert r.returncode == 0, r.stderr
    for word in ("weights", "adapter", "gradients", "optimizer state", "activations", "logits / loss",
                 "framework overhead", "verdict:", "largest micro-batch", "smallest hardware: 1 × A100-40GB", "lr 3e-05"):
        assert word in r.stdout
    j = _dsft("--model", "deepseek-llm-7b", "--gpu", "H100", "--examples", "1000", "--avg-tokens", "300", "--json")
    d = json.loads(j.stdout)
    assert d["fits"] is True and d["throughput"]["tokens_per_epoch"] == 300_000
    assert d["throughput"]["seconds_per_epoch"] > 0
    assert sum(d["memory_bytes"][k] for k in ("weights", "adapter", "gradients", "optimizer", "activations",
                                              "logits_loss", "overhead")) == pytest.approx(d["memory_bytes"]["peak"], abs=8)


@pytest.mark.parametrize("args,expect", [
    (["--model", "deepseek-llm-9b"], "deepseek-v3"),
    (["--model", "deepseek-llm-7b", "--gpu", "V100"], "A100-40GB"),
    (["--model", "deepseek-llm-7b", "--seq-len", "-1"], "positive"),
    (["--model", "deepseek-llm-7b", "--batch", "0"], "positive"),
    (["--model", "deepseek-llm-7b", "--method", "prefix"], "qlora"),
    (["--model", "deepseek-llm-7b", "--gpu=-24GB"], "memory size"),
    (["--model", "deepseek-llm-7b", "--gpu", "0GB"], "positive"),
])
def test_cli_bad_input_is_one_line_exit_2(args, expect):
    r = _dsft(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsft: error:") and expect in lines[0]


def test_cli_reads_a_dsft_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: r1-distill-qwen-14b}\ntrain: {method: qlora, per_device_train_batch_size: 4}\n"
                 "data: {max_seq_length: 1024}\nplan: {gpu: L40S}\n")
    r = _dsft(str(p), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["setup"]["method"] == "qlora" and d["setup"]["gpu"] == "L40S-48GB" and d["setup"]["seq_len"] == 1024


def test_plan_training_is_one_call_for_dsft_train():
    from dsft.plan import plan_training

    said: list[str] = []
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-7b"}, "data": {"max_seq_length": 1024},
                            "train": {"per_device_train_batch_size": "auto", "gradient_checkpointing": True},
                            "plan": {"gpu": "A100-40GB", "effective_batch_size": 32}})
    micro, accum, plan = plan_training(cfg, echo=said.append)
    assert micro * accum == 32 and plan.fits and "verdict: FITS" in said[0] and len(said) == 1
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-llm-67b"}, "train": {"per_device_train_batch_size": 4},
                            "plan": {"gpu": "4090"}})
    micro, accum, plan = plan_training(cfg, echo=said.append)
    assert (micro, accum) == (4, 1) and not plan.fits and said[-1].startswith("warning:")


def test_tokens_per_epoch_from_the_data_stage(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": "头痛怎么办" * 6}, {"role": "assistant", "content": "多休息" * 10}]}] * 40
    (run / "data" / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (run / "data" / "manifest.json").write_text(json.dumps({"train": "train.jsonl", "counts": {"train": 40}}))
    cfg = config_from_dict({"run_dir": str(run), "model": {"name_or_path": "deepseek-llm-7b"}, "plan": {"gpu": "H100"}})
    plan = plan_for_config(cfg, search=False)
    assert plan.examples == 40 and 20 < plan.avg_tokens < 80
    assert plan.tokens_per_epoch == int(40 * plan.avg_tokens) and plan.seconds_per_epoch > 0


def test_cli_example_config_resolves_auto_batch():
    r = _dsft(str(ROOT / "examples" / "plan_r1_distill_7b.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["setup"]
    assert s["micro_batch"] * s["grad_accum"] == 16 and s["micro_batch"] > 1 and s["gpu"] == "A100-40GB"


def test_plan_training_never_raises(tmp_path):
    from dsft.plan import plan_training

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    said: list[str] = []
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path)}, "train": {"per_device_train_batch_size": "auto"}})
    assert plan_training(cfg, echo=said.append) == (None, 1, None)
    assert said[0].startswith("warning: the memory planner cannot plan this run") and "num_hidden_layers" in said[0]
