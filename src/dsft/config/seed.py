"""The seed's config layout (model_name + HF-style training_args / data_args + PEFT-style lora_args) → dsft keys.

Every accepted key is listed here with the dsft key it sets; tests/config/test_seed_keys.py walks this table and
checks each key changes the resolved config (or is refused) — no key is accepted and silently ignored.
"""

from __future__ import annotations

import reprlib
from typing import Any

from dsft.errors import ConfigError

SEED_GROUPS = ("training_args", "data_args", "lora_args")
SEED_KEYS = {"model_name", *SEED_GROUPS}

# group → seed key → dsft key (dotted). Aliases (several seed names for one dsft key) may not be used together.
SEED_MAP: dict[str, dict[str, str]] = {
    "training_args": {
        "output_dir": "run_dir",
        "num_train_epochs": "train.num_train_epochs",
        "max_steps": "train.max_steps",
        "per_device_train_batch_size": "train.per_device_train_batch_size",
        "gradient_accumulation_steps": "train.gradient_accumulation_steps",
        "learning_rate": "train.learning_rate",
        "lr_scheduler_type": "train.lr_scheduler",
        "warmup_steps": "train.warmup_steps",
        "warmup_ratio": "train.warmup_ratio",
        "weight_decay": "train.weight_decay",
        "adam_beta1": "train.adam_beta1",
        "adam_beta2": "train.adam_beta2",
        "max_grad_norm": "train.max_grad_norm",
        "gradient_checkpointing": "train.gradient_checkpointing",
        "logging_dir": "train.logging_dir",
        "logging_steps": "train.logging_steps",
        "report_to": "train.report_to",
        "save_steps": "train.save_steps",
        "save_total_limit": "train.save_total_limit",
        "evaluation_strategy": "train.evaluation_strategy",
        "eval_strategy": "train.evaluation_strategy",
        "eval_steps": "train.eval_steps",
        "metric_for_best_model": "eval.during_training_metric",
        "early_stopping_patience": "train.early_stopping_patience",
        "early_stopping_threshold": "train.early_stopping_delta",
        "seed": "train.seed",
        "fp16": "train.precision",
        "bf16": "train.precision",
    },
    "data_args": {
        "dataset_path": "data.path",
        "test_size": "data.test_size",
        "eval_size": "data.eval_size",
        "max_seq_length": "data.max_seq_length",
    },
    "lora_args": {
        "r": "lora.r",
        "lora_r": "lora.r",
        "lora_rank": "lora.r",
        "rank": "lora.r",
        "lora_alpha": "lora.alpha",
        "alpha": "lora.alpha",
        "lora_dropout": "lora.dropout",
        "dropout": "lora.dropout",
        "target_modules": "lora.target_modules",
        "use_rslora": "lora.use_rslora",
        "use_dora": "lora.use_dora",
        "modules_to_save": "lora.modules_to_save",
    },
}
# HF scheduler names dsft runs identically (HF's plain "constant" skips warmup; dsft's constant warms up first)
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "cosine_with_restarts": "cosine_with_restarts",
               "constant_with_warmup": "constant"}


def quote(value: Any, limit: int = 200) -> str:
    """repr() of a value cut to `limit` characters (never building the whole repr of a huge value)."""
    if isinstance(value, str):
        s = repr(value[: limit + 1])
        return s if len(value) <= limit else f"{s[:limit]}… ({len(value):,} characters)"
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 12, 12, 12, 12
    r.maxstring = r.maxother = limit
    s = r.repr(value)
    return s if len(s) <= limit else f"{s[:limit]}…"


def put(out: dict, dotted: str, value: Any) -> None:
    d = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys[:-1])}: expected a mapping, got {type(nxt).__name__}")
        d = nxt
    d[keys[-1]] = value


def _has(out: dict, dotted: str) -> bool:
    d: Any = out
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def _precision(sub: dict, source: str) -> str | None:
    fp16, bf16 = sub.get("fp16"), sub.get("bf16")
    if fp16 and bf16:
        raise ConfigError(f"{source}: training_args.fp16 and training_args.bf16 are both true; keep one")
    if fp16:
        return "fp16"
    if bf16:
        return "bf16"
    return "fp32"  # fp16: false / bf16: false — as in HF TrainingArguments, full fp32 training


def _convert(key: str, value: Any, source: str) -> Any:
    if key == "lr_scheduler_type":
        if value not in _SCHEDULERS:
            raise ConfigError(f"{source}: training_args.lr_scheduler_type: {quote(value)} is not supported "
                              f"(accepted: {', '.join(_SCHEDULERS)})")
        return _SCHEDULERS[value]
    if key == "report_to" and isinstance(value, str):
        return [value]
    return value


def map_seed_layout(raw: dict, source: str) -> dict:
    """Translate the seed's layout into dsft sections; unknown keys and two names for one key are errors."""
    out = {k: v for k, v in raw.items() if k not in SEED_KEYS}
    set_by: dict[str, str] = {}
    if "model_name" in raw:
        if _has(out, "model.name_or_path"):
            raise ConfigError(f"{source}: model_name and model.name_or_path both set the model; keep one")
        put(out, "model.name_or_path", raw["model_name"])
    for group in SEED_GROUPS:
        sub = raw.get(group)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: {group}: expected a mapping, got {type(sub).__name__}")
        table = SEED_MAP[group]
        for key, value in sub.items():
            if key not in table:
                raise ConfigError(f"{source}: {group}.{quote(key, 80).strip(chr(39))}: unknown key "
                                  f"(accepted: {', '.join(sorted(table))})")
            target = table[key]
            if target in set_by and not (key in ("fp16", "bf16") and set_by[target] in ("fp16", "bf16")):
                raise ConfigError(f"{source}: {group}.{key} and {group}.{set_by[target]} both set {target}; keep one")
            if _has(out, target):
                raise ConfigError(f"{source}: {group}.{key} and {target} both set {target}; keep one")
            set_by[target] = key
            if key not in ("fp16", "bf16"):
                put(out, target, _convert(key, value, source))
        if group == "training_args" and ("fp16" in sub or "bf16" in sub):
            put(out, "train.precision", _precision(sub, source))
    return out
