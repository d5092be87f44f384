"""ONE pydantic schema for every stage; loads dsft YAML and the seed's training_args/data_args layout."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from dsft.config.base import Section
from dsft.config.data import EMBEDDED_DATA, DataConfig
from dsft.config.distill import DistillConfig
from dsft.config.esft import EsftConfig
from dsft.config.eval import EvalConfig
from dsft.config.export import ExportConfig
from dsft.config.model import EMBEDDED_MODEL, ModelConfig
from dsft.config.plan import PlanConfig
from dsft.config.preference import DpoConfig, GrpoConfig
from dsft.config.resolution import Resolution
from dsft.config.resolve import resolve_config
from dsft.config.seed import SEED_KEYS, map_seed_layout, put, quote
from dsft.config.serve import ServeConfig
from dsft.config.train import LoraConfig, TrainConfig
from dsft.config.yaml_io import load_yaml_file
from dsft.errors import ConfigError

__all__ = [
    "Config", "ModelConfig", "DataConfig", "TrainConfig", "LoraConfig", "EvalConfig", "ExportConfig",
    "ServeConfig", "PlanConfig", "DpoConfig", "GrpoConfig", "EsftConfig", "Resolution", "load_config", "config_from_dict", "EMBEDDED_MODEL", "EMBEDDED_DATA",
    "resolve_config",
]


class Config(Section):
    run_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    esft: EsftConfig = Field(default_factory=EsftConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    resolution: Resolution | None = None
    """Filled by dsft.config.resolve (preset, why, where each value came from); None until resolved."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = quote(".".join(str(p) for p in e["loc"]), 120).strip("'\"") or "<root>"
    if e["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key"
    got = e.get("input")
    got_s = f", got {quote(got)}" if got is not None and not isinstance(got, dict) else ""
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {str(e['msg'])[:200]}{got_s}{more}"


def config_from_dict(raw: dict | None, source: str = "<config>") -> Config:
    """Validate a raw mapping (dsft or seed layout) into a Config; one-line ConfigError on failure."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw or {})
    if SEED_KEYS & raw.keys():
        raw = map_seed_layout(raw, source)
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
        raw = load_yaml_file(p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
        if SEED_KEYS & raw.keys():
            raw = map_seed_layout(raw, source)
    for dotted, value in (overrides or {}).items():
        put(raw, dotted, value)
    return config_from_dict(raw, source)
