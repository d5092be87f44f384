"""Defaults resolved once: one preset table, the model's size class, every value concrete, idempotent, recorded."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from dsft.cli_common import config_and_run
from dsft.cli_demo import demo_config_path
from dsft.config import config_from_dict, load_config, resolve_config
from dsft.config.presets import PRESETS, SWEEP, preset_for
from dsft.config.resolve import dump_yaml
from dsft.errors import ConfigError
from dsft.model.info import read_model_info

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = "embedded:tiny-deepseek-v3"


def _resolve(raw: dict, model: str = EMBEDDED):
    cfg = config_from_dict({"model": {"name_or_path": model}, **raw})
    return resolve_config(cfg, read_model_info(model))


def test_the_demo_resolves_to_what_it_always_trained_with():
    """The embedded demo's numbers must not move: lr 2e-3, r 16 / alpha 32, 8 × 1, 3 epochs, β2 0.999,
    embeddings + head + norms trained fully — exactly the modules the trainer's old rule chose."""
    from dsft.model.adapters import default_modules_to_save
    from dsft.model.load import load_model

    cfg = load_config(demo_config_path())
    info = read_model_info(cfg.model.name_or_path)
    r = resolve_config(cfg, info)
    t = r.train
    assert (t.learning_rate, r.lora.r, r.lora.alpha, t.num_train_epochs) == (2e-3, 16, 32.0, 3)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.adam_beta2) == (8, 1, 0.999)
    assert r.data.eval_size == 0 and r.plan.effective_batch_size is None
    assert r.lora.modules_to_save == default_modules_to_save(load_model(info.local_dir, dtype="float32"))
    assert r.resolution.preset == "tiny" and r.resolution.random_init
    assert r.resolution.sources["train.num_train_epochs"] == "config"
    assert r.resolution.sources["train.learning_rate"] == "preset tiny"


def test_resolution_is_idempotent_and_survives_its_own_yaml(tmp_path):
    for raw in ({}, {"train": {"evaluation_strategy": "steps", "early_stopping_patience": 3}},
                {"train": {"method": "full", "per_device_train_batch_size": "auto"}}):
        info = read_model_info(EMBEDDED)
        once = resolve_config(config_from_dict(raw), info)
        twice = resolve_config(once, info)
        assert twice.model_dump() == once.model_dump()
        reloaded = config_from_dict(yaml.safe_load(dump_yaml(once)))
        assert resolve_config(reloaded, info).model_dump() == once.model_dump()
    assert resolve_config(config_from_dict({}), info) is not None


def test_resolving_for_another_model_rederives_only_preset_values(pretrained_llama):
    tiny = _resolve({"train": {"learning_rate": 5e-4}})
    assert tiny.lora.r == 16 and tiny.resolution.preset == "tiny"
    moved = tiny.model_copy(deep=True)
    moved.model.name_or_path = str(pretrained_llama)
    again = resolve_config(moved, read_model_info(str(pretrained_llama)))
    assert again.resolution.preset == "small" and again.lora.modules_to_save == []
    assert again.train.learning_rate == 5e-4  # the user's value stays
    assert again.train.num_train_epochs == 1 and again.train.per_device_train_batch_size == "auto"


def test_the_user_wins_and_the_record_says_so():
    r = _resolve({"lora": {"r": 4}, "train": {"learning_rate": 1e-3, "num_train_epochs": 2}})
    assert (r.lora.r, r.lora.alpha, r.train.learning_rate, r.train.num_train_epochs) == (4, 8.0, 1e-3, 2)
    src = r.resolution.sources
    assert src["lora.r"] == src["train.learning_rate"] == "config" and src["lora.alpha"] == "rule: 2 × lora.r"


def test_tiny_row_only_for_random_init_models(random_init_llama, pretrained_llama):
    rand, trained = read_model_info(str(random_init_llama)), read_model_info(str(pretrained_llama))
    assert rand.random_init and not trained.random_init
    assert rand.params == trained.params < 1e6
    r = _resolve({}, str(random_init_llama))
    assert r.resolution.preset == "tiny" and r.train.learning_rate == 2e-3 and r.lora.modules_to_save
    p = _resolve({}, str(pretrained_llama))
    assert p.resolution.preset == "small"
    assert (p.train.learning_rate, p.lora.r, p.train.num_train_epochs, p.lora.modules_to_save) == (5e-4, 16, 1, [])
    assert p.train.per_device_train_batch_size == "auto" and p.plan.effective_batch_size == 8
    assert "pretrained" in p.resolution.why and "benchmarks/preset_sweep.py" in p.resolution.why


def test_a_1p5b_r1_distill_lands_in_the_small_row_not_7b(r1_distill_1p5b):
    from dsft.plan.models import resolve_arch
    from dsft.plan.recommend import recommend

    info = read_model_info(str(r1_distill_1p5b))
    assert 1.7e9 < info.params < 1.9e9 and not info.random_init
    assert _resolve({}, str(r1_distill_1p5b)).resolution.preset == "small"
    assert recommend(resolve_arch("r1-distill-qwen-1.5b")).size_class == "small"


def test_seed_matrix_rows_and_the_plan_reads_the_same_table():
    from dsft.plan.models import resolve_arch
    from dsft.plan.recommend import recommend

    p7, p13, p34 = preset_for(7e9), preset_for(13e9), preset_for(34e9)
    assert (p7.learning_rate, p7.lora_r, p7.batch, p7.hardware) == (3e-5, 32, 16, "1 × A100-40GB")
    assert (p13.learning_rate, p13.lora_r, p13.batch, p13.hardware) == (2e-5, 48, 8, "2 × A100-40GB")
    assert (p34.learning_rate, p34.lora_r, p34.batch, p34.hardware) == (1e-5, 64, 4, "4 × A100-40GB")
    assert preset_for(3e6).name == "small" and preset_for(3e6, random_init=True).name == "tiny"
    assert preset_for(None).name == "34B+"
    assert [p.name for p in PRESETS if p.source == SWEEP] == ["small"]
    rec = recommend(resolve_arch("deepseek-llm-7b"))
    assert (rec.size_class, rec.learning_rate, rec.lora_rank, rec.effective_batch) == ("7B", 3e-5, 32, 16)
    assert recommend(resolve_arch(EMBEDDED)).size_class == "tiny"


@pytest.mark.parametrize("model,batch", [("deepseek-ai/deepseek-llm-7b-base", 16), ("DeepSeek-13B", 8),
                                         ("DeepSeek-34B", 4)])
def test_seed_batch_is_the_default_effective_batch(model, batch):
    r = _resolve({}, model)
    assert r.train.per_device_train_batch_size == "auto" and r.plan.effective_batch_size == batch
    r = _resolve({"train": {"gradient_accumulation_steps": 2}}, model)
    assert r.plan.effective_batch_size == 2 * batch  # the planner's rule: the preset's batch per accumulation step
    r = _resolve({"train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}}, model)
    assert (r.train.per_device_train_batch_size, r.train.gradient_accumulation_steps) == (4, 4)
    assert r.resolution.sources["train.per_device_train_batch_size"] == "config"


def test_plan_and_train_get_the_same_auto_split_from_the_resolved_config():
    from dsft.plan import auto_micro_batch

    r = _resolve({"data": {"max_seq_length": 2048}, "plan": {"gpu": "A100-40GB"}}, "deepseek-llm-7b")
    micro, accum = auto_micro_batch(r)
    assert micro * accum == 16 and micro < 16


def test_full_fine_tuning_gets_beta2_095_and_refuses_lora_keys():
    r = _resolve({"train": {"method": "full"}})
    assert r.train.adam_beta2 == 0.95 and r.resolution.sources["train.adam_beta2"].startswith("rule")
    with pytest.raises(ConfigError, match="lora.r has no effect with train.method full"):
        _resolve({"train": {"method": "full"}, "lora": {"r": 8}})
    with pytest.raises(ConfigError, match="lora.dropout"):
        _resolve({"train": {"method": "freeze"}, "lora": {"dropout": 0.2}})


def test_evaluation_carves_an_eval_split_or_refuses():
    r = _resolve({"train": {"evaluation_strategy": "epoch"}})
    assert r.data.eval_size == 0.05 and r.resolution.sources["data.eval_size"].startswith("carved")
    off = r.model_copy(deep=True)
    off.train.evaluation_strategy = "no"
    assert resolve_config(off, read_model_info(EMBEDDED)).data.eval_size == 0  # carved only while evaluating
    assert _resolve({"train": {"evaluation_strategy": "steps"}, "data": {"eval_size": 0.2}}).data.eval_size == 0.2
    with pytest.raises(ConfigError, match=r"data.eval_size is 0 but train.evaluation_strategy steps"):
        _resolve({"train": {"evaluation_strategy": "steps"}, "data": {"eval_size": 0}})
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluation"):
        _resolve({"train": {"early_stopping_patience": 3}})


@pytest.mark.parametrize("raw,key", [
    ({"train": {"eval_steps": 50}}, "train.eval_steps"),
    ({"train": {"evaluation_strategy": "epoch", "eval_steps": 50}}, "train.eval_steps"),
    ({"train": {"early_stopping_delta": 0.01}}, "train.early_stopping_delta"),
    ({"eval": {"during_training_metric": "rouge_l"}}, "eval.during_training_metric"),
    ({"train": {"warmup_steps": 10, "warmup_ratio": 0.1}}, "train.warmup_ratio"),
    ({"train": {"logging_dir": "logs", "report_to": ["none"]}}, "train.logging_dir"),
    ({"train": {"per_device_train_batch_size": "auto", "gradient_accumulation_steps": 2},
      "plan": {"effective_batch_size": 16}}, "train.gradient_accumulation_steps"),
])
def test_keys_that_would_do_nothing_are_refused(raw, key):
    with pytest.raises(ConfigError) as e:
        _resolve(raw)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_config_and_run_writes_resolved_config_and_prints_the_preset_once(tmp_path, capsys):
    args = argparse.Namespace(config=str(demo_config_path()), run_dir=str(tmp_path / "run"),
                              overrides=["train.max_steps=3"], command="train")
    cfg, run = config_and_run(args)
    written = (run.root / "resolved_config.yaml").read_text(encoding="utf-8")
    assert "resolution:" in written and "preset: tiny" in written
    out = capsys.readouterr()
    assert out.out.count("dsft: preset tiny") == 1 and "random-init" in out.out and "3 steps (train.max_steps)" in out.out
    assert out.err == ""
    config_and_run(argparse.Namespace(**{**vars(args), "command": "export"}))  # stdout is export's JSON: silent
    assert capsys.readouterr().out == ""
    again = load_config(run.root / "resolved_config.yaml")
    assert resolve_config(again, read_model_info(EMBEDDED)).model_dump() == cfg.model_dump()


def test_every_example_config_resolves():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        cfg = load_config(path)
        r = resolve_config(cfg, read_model_info(cfg.model.name_or_path))
        assert r.train.learning_rate and r.lora.r and r.resolution.preset, path


def test_dsft_plan_on_a_config_plans_the_resolved_config(tmp_path):
    """`dsft plan CONFIG` and `dsft train CONFIG` see the same numbers: plan resolves the config as train does
    (here the seed's 7B effective batch 16, split by memory), instead of the raw config's unset values."""
    from dsft.plan.api import auto_micro_batch, request_from_options

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name_or_path: deepseek-llm-7b\ndata:\n  max_seq_length: 2048\nplan:\n  gpu: A100-40GB\n",
                 encoding="utf-8")
    req, _ = request_from_options({"config": str(p)})
    resolved = _resolve({"data": {"max_seq_length": 2048}, "plan": {"gpu": "A100-40GB"}}, "deepseek-llm-7b")
    assert (req.micro_batch, req.grad_accum) == auto_micro_batch(resolved)
    assert req.micro_batch * req.grad_accum == 16 and req.lora_rank in (None, resolved.lora.r)
