"""Every key the seed layout accepts changes the resolved config (or is refused): no silent no-op."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dsft.config import config_from_dict, resolve_config
from dsft.config.seed import SEED_MAP
from dsft.errors import ConfigError
from dsft.model.info import read_model_info

SRC = Path(__file__).resolve().parents[2] / "src" / "dsft"
EMBEDDED = "embedded:tiny-deepseek-v3"
BASE = {"model_name": EMBEDDED, "training_args": {"evaluation_strategy": "steps", "early_stopping_patience": 3}}
# one non-default value per accepted seed key; a key added to SEED_MAP without a line here fails the walk
VALUES = {
    ("training_args", "output_dir"): "elsewhere",
    ("training_args", "num_train_epochs"): 2,
    ("training_args", "max_steps"): 5,
    ("training_args", "per_device_train_batch_size"): 2,
    ("training_args", "gradient_accumulation_steps"): 2,
    ("training_args", "learning_rate"): 1e-5,
    ("training_args", "lr_scheduler_type"): "linear",
    ("training_args", "warmup_steps"): 10,
    ("training_args", "warmup_ratio"): 0.1,
    ("training_args", "weight_decay"): 0.1,
    ("training_args", "adam_beta1"): 0.8,
    ("training_args", "adam_beta2"): 0.98,
    ("training_args", "max_grad_norm"): 0.5,
    ("training_args", "gradient_checkpointing"): True,
    ("training_args", "logging_dir"): "tb-logs",
    ("training_args", "logging_steps"): 3,
    ("training_args", "report_to"): "none",
    ("training_args", "save_steps"): 7,
    ("training_args", "save_total_limit"): 5,
    ("training_args", "evaluation_strategy"): "epoch",
    ("training_args", "eval_strategy"): "epoch",
    ("training_args", "eval_steps"): 7,
    ("training_args", "metric_for_best_model"): "rouge_l",
    ("training_args", "early_stopping_patience"): 5,
    ("training_args", "early_stopping_threshold"): 0.01,
    ("training_args", "seed"): 7,
    ("training_args", "fp16"): True,
    ("training_args", "bf16"): True,
    ("data_args", "dataset_path"): "data/qa.jsonl",
    ("data_args", "test_size"): 0.2,
    ("data_args", "eval_size"): 0.1,
    ("data_args", "max_seq_length"): 256,
    ("lora_args", "r"): 4,
    ("lora_args", "lora_r"): 4,
    ("lora_args", "lora_rank"): 4,
    ("lora_args", "rank"): 4,
    ("lora_args", "lora_alpha"): 8,
    ("lora_args", "alpha"): 8,
    ("lora_args", "lora_dropout"): 0.2,
    ("lora_args", "dropout"): 0.2,
    ("lora_args", "target_modules"): ["q_a_proj"],
    ("lora_args", "use_rslora"): True,
    ("lora_args", "use_dora"): True,
    ("lora_args", "modules_to_save"): ["lm_head"],
}


def _resolved(raw: dict) -> dict:
    cfg = config_from_dict(raw)
    out = resolve_config(cfg, read_model_info(cfg.model.name_or_path)).model_dump()
    out.pop("resolution")
    return out


def _at(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_the_walk_covers_every_accepted_key():
    accepted = {(g, k) for g, table in SEED_MAP.items() for k in table}
    assert accepted == set(VALUES)


@pytest.mark.parametrize("group,key", sorted(VALUES))
def test_each_seed_key_changes_the_resolved_config(group, key):
    base = _resolved(BASE)
    raw = {**BASE, group: {**BASE.get(group, {}), key: VALUES[(group, key)]}}
    if key == "eval_strategy":
        raw["training_args"].pop("evaluation_strategy")
    changed = _resolved(raw)
    target = SEED_MAP[group][key]
    assert _at(changed, target) != _at(base, target), f"{group}.{key} → {target} did not change the resolved config"


def test_model_name_and_false_precision_flags_change_it_too():
    base = _resolved(BASE)
    assert _resolved({**BASE, "model_name": "deepseek-llm-7b"})["lora"]["r"] == 32 != base["lora"]["r"]
    for flag in ("fp16", "bf16"):
        raw = {**BASE, "training_args": {**BASE["training_args"], flag: False}}
        assert _resolved(raw)["train"]["precision"] == "fp32" != base["train"]["precision"]


def test_every_target_key_is_read_by_some_stage():
    """The dsft key each seed key sets is read outside dsft/config — accepted keys are consumed, not parked."""
    read: set[str] = set()
    for path in SRC.rglob("*.py"):
        if "config" in path.relative_to(SRC).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                read.add(node.attr)
    targets = {t.rsplit(".", 1)[-1] for table in SEED_MAP.values() for t in table.values()}
    assert targets - read == set()


@pytest.mark.parametrize("raw,msg", [
    ({"training_args": {"evaluation_strategy": "steps", "eval_strategy": "steps"}}, "keep one"),
    ({"lora_args": {"r": 4, "lora_rank": 8}}, "keep one"),
    ({"training_args": {"learning_rate": 1e-4}, "train": {"learning_rate": 2e-4}}, "keep one"),
    ({"training_args": {"fp16": True, "bf16": True}}, "both true"),
    ({"training_args": {"lr_scheduler_type": "polynomial"}}, "lr_scheduler_type"),
    ({"training_args": {"eval_steps": 50}}, "train.eval_steps"),
    ({"training_args": {"early_stopping_threshold": 0.01}}, "early_stopping_patience"),
    ({"training_args": {"early_stopping_patience": 3}}, "needs evaluation"),
    ({"training_args": {"evaluation_strategy": "steps"}, "data_args": {"eval_size": 0}}, "data.eval_size is 0"),
])
def test_seed_keys_that_conflict_or_would_do_nothing_are_refused(raw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        _resolved({"model_name": EMBEDDED, **raw})
    assert "\n" not in str(e.value)
