"""Stage 'eval' of dsft: metrics, predictors, reports; `evaluate(cfg, run)` is the stage function."""

from __future__ import annotations

from typing import Any


def evaluate(cfg, run, force: bool = False) -> dict[str, Any]:
    """Evaluate base vs fine-tuned on the held-out split of a run directory (see dsft.eval.stage)."""
    from dsft.eval.stage import evaluate as _evaluate

    return _evaluate(cfg, run, force=force)


def add_variants(cfg, run) -> dict[str, Any]:
    """After the export stage: score its variants on the same records and add them to eval.json and the reports."""
    from dsft.eval.stage import add_variants as _add

    return _add(cfg, run)


__all__ = ["evaluate", "add_variants"]
