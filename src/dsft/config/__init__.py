"""ONE pydantic schema for every stage; loads dsft YAML and the seed's training_args/data_args layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from dsft.config.base import Section
from dsft.config.data import EMBEDDED_DATA, DataConfig
from dsft.config.eval import EvalConfig
from dsft.config.export import ExportConfig
from dsft.config.model import EMBEDDED_MODEL, ModelConfig
from dsft.config.plan import PlanConfig
from dsft.config.serve import ServeConfig
from dsft.config.train import LoraConfig, TrainConfig
from dsft.errors import ConfigError

__all__ = [
    "Config", "ModelConfig", "DataConfig", "TrainConfig", "LoraConfig", "EvalConfig", "ExportConfig",
    "ServeConfig", "PlanConfig", "load_config", "config_from_dict", "EMBEDDED_MODEL", "EMBEDDED_DATA",
]


class Config(Section):
    run_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)


# The seed's layout: model_name + training_args + data_args (HF TrainingArguments style).
_SEED_TRAINING_ARGS = {
    "output_dir": ("run_dir",),
    "num_train_epochs": ("train", "num_train_epochs"),
    "per_device_train_batch_size": ("train", "per_device_train_batch_size"),
    "gradient_accumulation_steps": ("train", "gradient_accumulation_steps"),
    "learning_rate": ("train", "learning_rate"),
    "warmup_steps": ("train", "warmup_steps"),
    "logging_dir": ("train", "logging_dir"),
    "logging_steps": ("train", "logging_steps"),
    "save_steps": ("train", "save_steps"),
    "evaluation_strategy": ("train", "evaluation_strategy"),
    "eval_strategy": ("train", "evaluation_strategy"),
    "eval_steps": ("train", "eval_steps"),
    "weight_decay": ("train", "weight_decay"),
    "max_grad_norm": ("train", "max_grad_norm"),
    "seed": ("train", "seed"),
    "max_steps": ("train", "max_steps"),
}
_SEED_DATA_ARGS = {
    "dataset_path": ("data", "path"),
    "test_size": ("data", "test_size"),
    "max_seq_length": ("data", "max_seq_length"),
}
_SEED_KEYS = {"model_name", "training_args", "data_args"}


def _put(out: dict, path: tuple[str, ...], value: Any) -> None:
    d = out
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _map_seed_layout(raw: dict, source: str) -> dict:
    """Translate the seed's layout into dsft sections; unknown seed keys are errors too."""
    out = {k: v for k, v in raw.items() if k not in _SEED_KEYS}
    if "model_name" in raw:
        _put(out, ("model", "name_or_path"), raw["model_name"])
    for group, table in (("training_args", _SEED_TRAINING_ARGS), ("data_args", _SEED_DATA_ARGS)):
        sub = raw.get(group) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: {group}: expected a mapping, got {type(sub).__name__}")
        for key, value in sub.items():
            if key == "fp16":
                if value:
                    _put(out, ("train", "precision"), "fp16")
                continue
            if key == "bf16":
                if value:
                    _put(out, ("train", "precision"), "bf16")
                continue
            if key not in table:
                raise ConfigError(f"{source}: {group}.{key}: unknown key (accepted: {', '.join(sorted(table) + (['fp16', 'bf16'] if group == 'training_args' else []))})")
            _put(out, table[key], value)
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key"
    got = e.get("input")
    got_s = f", got {got!r}" if got is not None and not isinstance(got, dict) else ""
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {e['msg']}{got_s}{more}"


def config_from_dict(raw: dict | None, source: str = "<config>") -> Config:
    """Validate a raw mapping (dsft or seed layout) into a Config; one-line ConfigError on failure."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if _SEED_KEYS & raw.keys():
        raw = _map_seed_layout(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from err


def load_config(path: str | Path | None, overrides: dict | None = None) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply dotted overrides."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} not valid YAML ({getattr(err, 'problem', err)})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
        if _SEED_KEYS & raw.keys():
            raw = _map_seed_layout(raw, source)
    for dotted, value in (overrides or {}).items():
        _put(raw, tuple(dotted.split(".")), value)
    return config_from_dict(raw, source)
