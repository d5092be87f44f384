"""`export:` section — merge, dtypes, quantized variants, report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class ExportConfig(Section):
    dtype: Literal["float32", "float16", "bfloat16", "fp8"] = "float32"
    """dtype of merged/; fp8 (a shipped FP8 base only): DeepSeek's e4m3 blocks, merged shard by shard."""
    formats: list[Literal["merged", "fp16", "bf16", "int8", "int4", "nf4", "bnb-int8", "gguf-f16", "gguf-q8_0",
                          "gguf-q4_k_m"]] = Field(default_factory=lambda: ["merged"])
    """Variants to produce: merged, fp16, bf16 (the merged model in 16 bits), int8, int4 (dsft CPU kernels), nf4, bnb-int8 (bitsandbytes, extra `qlora`: on the
    GPU, or its CPU backend without CUDA), gguf-f16, gguf-q8_0, gguf-q4_k_m (optional extra `gguf`)."""
    report: bool = False
    """After export, the eval stage measures every variant (size, perplexity, task metric, prefill/decode tokens/s)
    → <run_dir>/eval/quant_report.json/.md/.png."""
    report_samples: int = Field(16, gt=0)
    """Held-out records the report measures perplexity and the task metric on."""
    report_new_tokens: int = Field(32, gt=0)
    """Greedy tokens generated per record for the task metric and the decode speed."""
    report_threads: int | None = Field(None, gt=0)
    """CPU threads for the speed columns (default: torch's current setting)."""
    report_clock: Literal["wall", "cpu"] = "wall"
    """Speed clock: wall time, or this process's CPU time (robust on a shared machine; use with report_threads: 1)."""
