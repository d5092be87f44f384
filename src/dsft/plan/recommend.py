"""Recommended hyperparameters by model size: the one preset table of `dsft.config.presets` (seed matrix + rows)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from dsft.config.presets import preset_for
from dsft.plan.models import Arch


@dataclass(frozen=True)
class Recommendation:
    size_class: str
    learning_rate: float
    lora_rank: int
    effective_batch: int
    hardware: str  # the seed's sizing line, e.g. "1 × A100-40GB"

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=64)
def _random_init(name: str, source: str) -> bool:
    """Whether the planned model is random-init (the embedded model, or a folder whose norms are at init)."""
    if name.startswith("embedded:"):
        return True
    folder = Path(source).parent if source.endswith(".json") else Path(source)
    if source == "builtin" or not folder.is_dir():
        return False
    from dsft.model.info import read_model_info

    return read_model_info(str(folder)).random_init


def recommend(arch: Arch) -> Recommendation:
    """The preset row for the model's size (7B: lr 3e-5, rank 32, batch 16; 13B: 2e-5/48/8; 34B: 1e-5/64/4)."""
    p = preset_for(arch.total_params(), random_init=_random_init(arch.name, arch.source))
    return Recommendation(p.name, p.learning_rate, p.lora_r, p.batch, p.hardware)
