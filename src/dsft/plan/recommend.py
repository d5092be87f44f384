"""Recommended hyperparameters by model size: the seed's matrix (7B / 13B / 34B) extended at both ends."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


# (parameters below, class, lr, rank, effective batch, seed hardware) — the same rows and bounds as dsft train's
# presets: the seed's 7B / 13B / 34B matrix plus the tiny row measured on the embedded demo models
SEED_MATRIX = [
    (0.5e9, "tiny", 2e-3, 16, 8, "CPU or any GPU"),
    (10e9, "7B", 3e-5, 32, 16, "1 × A100-40GB"),
    (20e9, "13B", 2e-5, 48, 8, "2 × A100-40GB"),
    (float("inf"), "34B+", 1e-5, 64, 4, "4 × A100-40GB"),
]


def recommend(arch: Arch) -> Recommendation:
    """The seed's matrix by total parameter count (7B: lr 3e-5, rank 32, batch 16; 13B: 2e-5/48/8; 34B: 1e-5/64/4)."""
    n = arch.total_params()
    for bound, name, lr, rank, batch, hw in SEED_MATRIX:
        if n < bound:
            return Recommendation(name, lr, rank, batch, hw)
    raise AssertionError("unreachable")  # pragma: no cover
