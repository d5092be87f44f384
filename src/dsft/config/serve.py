"""`serve:` section — the API server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    """0 (or a busy port, for in-process servers) picks a free port."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>` on every route but /health, /metrics, /openapi.json (env DSFT_API_KEY)."""
    auth_all: bool = False
    """With an API key: require it on /health, /metrics and /openapi.json too."""
    engine: Literal["transformers", "vllm", "llamacpp"] = "transformers"
    max_batch_size: int = Field(8, gt=0)
    """Requests decoded together in one forward pass (continuous batching)."""
    max_queue: int = Field(64, gt=0)
    """Requests allowed to wait for a batch slot; more are answered 429 with Retry-After."""
    served_model_name: str | None = None
    max_model_len: int | None = Field(None, gt=0)
    """Context length (prompt + completion); default: the model's max_position_embeddings."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    chat_template: str | None = None
    """A DeepSeek template name overriding the tokenizer's (deepseek-v3, r1-distill, deepseek-llm …)."""
    lora_modules: dict[str, str] = Field(default_factory=dict)
    """Named LoRA adapters over the base: {name: adapter folder}; chosen per request by `model`."""
    esft_delta: str | None = None
    """An ESFT expert delta folder (`dsft train` method esft: <run_dir>/train/esft) applied to the base at load time:
    base + delta without a merged copy (transformers engine)."""
    startup_timeout_s: float = Field(600.0, gt=0)
    shutdown_timeout_s: float = Field(60.0, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM engine only."""
    tensor_parallel_size: int = Field(1, gt=0)
    """vLLM engine only."""
