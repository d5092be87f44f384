"""The learning-rate schedule: linear warmup, then constant / linear / cosine / cosine with restarts (seed rule)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str, cycle_fraction: float) -> float:
    """Multiplier of the base LR at 0-based optimizer step `step` (linear warmup, then the schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    cycles = max(1, round(1.0 / cycle_fraction))  # seed rule: one cycle = cycle_fraction of the steps
    return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
