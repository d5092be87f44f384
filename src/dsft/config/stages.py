"""`eval:`, `export:`, `serve:` and `plan:` sections."""

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


class ExportConfig(Section):
    merge: bool = True
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    formats: list[str] = Field(default_factory=lambda: ["merged"])
    """Variants to produce: merged, int8, int4, gguf-f16, gguf-q8_0, gguf-q4_k_m."""
    report: bool = False


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    api_key: str | None = None
    engine: Literal["transformers", "vllm", "llamacpp"] = "transformers"
    max_batch_size: int = Field(8, gt=0)
    max_queue: int = Field(64, gt=0)
    served_model_name: str | None = None


class PlanConfig(Section):
    gpu: str | None = None
    num_gpus: int = Field(1, gt=0)
