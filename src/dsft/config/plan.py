"""`plan:` section — hardware sizing."""

from __future__ import annotations

from pydantic import Field

from dsft.config.base import Section


class PlanConfig(Section):
    gpu: str | None = None
    num_gpus: int = Field(1, gt=0)
