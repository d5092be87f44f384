"""The one config schema: dsft layout, the seed's layout, one-line errors for bad keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsft.config import Config, load_config
from dsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_demo():
    cfg = Config()
    assert cfg.model.name_or_path == "embedded:tiny-deepseek-v3"
    assert cfg.data.path == "embedded:medical"
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.model.trust_remote_code is False


def test_seed_config_loads_and_maps():
    cfg = load_config(ROOT / "examples" / "seed_config.yaml")
    assert cfg.model.name_or_path == "deepseek-ai/deepseek-llm-7b-base"
    assert cfg.run_dir == "./results"
    assert cfg.train.num_train_epochs == 3
    assert cfg.train.per_device_train_batch_size == 4
    assert cfg.train.gradient_accumulation_steps == 4
    assert cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.train.warmup_steps == 500
    assert cfg.train.logging_dir == "./logs"
    assert cfg.train.save_steps == 1000
    assert cfg.train.precision == "fp16"
    assert cfg.train.evaluation_strategy == "steps"
    assert cfg.train.eval_steps == 500
    assert cfg.data.path == "./data/medical_qa.jsonl"
    assert cfg.data.test_size == pytest.approx(0.1)
    assert cfg.data.max_seq_length == 2048


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learnin_rate: 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.learnin_rate" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_unknown_seed_key_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model_name: x\ntraining_args:\n  num_epochs: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"training_args\.num_epochs: unknown key"):
        load_config(p)


def test_wrong_type_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  num_train_epochs: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.num_train_epochs"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate():
    cfg = load_config(None, {"train.max_steps": 5, "run_dir": "x"})
    assert cfg.train.max_steps == 5 and cfg.run_dir == "x"
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, {"train.max_steps": -1})
