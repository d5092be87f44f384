"""The run's preset-dependent hyperparameters, resolved in ONE function from the config and the model's size.

The stage receives a config resolved once by `dsft.config.resolve` (train/stage.py resolves one that is not), so
here every value is read from it; the preset is the one the resolution recorded. Only an unresolved config (the
planner's measurement builds models in memory, some tests) falls back to the preset table by parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsft.config import Config
from dsft.config.presets import preset_for, preset_named

TINY_MODEL_PARAMS = 100e6
"""Below this size `lora.modules_to_save: auto` trains embeddings, LM head and norms fully (random-init demo models)."""


@dataclass(frozen=True)
class Hyperparameters:
    """Concrete values for everything the config may leave to the preset."""

    preset: str
    learning_rate: float
    epochs: float
    lora_r: int
    lora_alpha: float
    adam_beta2: float
    auto_micro_batch: int
    """Micro-batch for `per_device_train_batch_size: auto` when the planner cannot answer."""
    modules_to_save: list[str] | Literal["default"]
    """Fully trained modules next to an adapter; "default" = dsft.model.adapters.default_modules_to_save(model)."""


def hyperparameters(cfg: Config, n_params: int) -> Hyperparameters:
    """Fill the config's open values from the preset for a model of `n_params` parameters."""
    tc, lc = cfg.train, cfg.lora
    if cfg.resolution is not None:
        preset = preset_named(cfg.resolution.preset)
    else:  # built in memory, random-init: the tiny row below 0.5 B as before the resolution step existed
        preset = preset_for(n_params, random_init=True)
    r = lc.r or preset.lora_r
    mts = lc.modules_to_save
    if mts == "auto":
        mts = "default" if n_params < TINY_MODEL_PARAMS else []
    return Hyperparameters(
        preset=preset.name,
        learning_rate=tc.learning_rate or preset.learning_rate,
        epochs=tc.num_train_epochs or preset.epochs,
        lora_r=r,
        lora_alpha=lc.alpha or 2 * r,
        adam_beta2=tc.adam_beta2 or (0.95 if tc.method in ("full", "freeze", "esft") else 0.999),
        auto_micro_batch=preset.batch,
        modules_to_save=mts,
    )
