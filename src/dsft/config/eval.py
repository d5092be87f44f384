"""`eval:` section — held-out evaluation, metrics, reports."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class EvalConfig(Section):
    max_samples: int | None = Field(64, gt=0)
    """Evaluate on at most this many held-out records (deterministic), None = all."""
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    lang: Literal["auto", "zh", "en"] = "auto"
    metrics: list[str] = Field(default_factory=lambda: ["loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1"])
    compare_base: bool = True
