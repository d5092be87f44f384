"""`export:` section — merge, dtypes, quantized variants, report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class ExportConfig(Section):
    merge: bool = True
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    formats: list[str] = Field(default_factory=lambda: ["merged"])
    """Variants to produce: merged, int8, int4, gguf-f16, gguf-q8_0, gguf-q4_k_m."""
    report: bool = False
