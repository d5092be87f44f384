"""`serve:` section — the API server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    api_key: str | None = None
    engine: Literal["transformers", "vllm", "llamacpp"] = "transformers"
    max_batch_size: int = Field(8, gt=0)
    max_queue: int = Field(64, gt=0)
    served_model_name: str | None = None
