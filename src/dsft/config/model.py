"""`model:` section — which base model and tokenizer to load, and how."""

from __future__ import annotations

from typing import Literal

from dsft.config.base import Section

EMBEDDED_MODEL = "embedded:tiny-deepseek-v3"


class ModelConfig(Section):
    name_or_path: str = EMBEDDED_MODEL
    """A local Hugging Face model directory, or `embedded:tiny-deepseek-v3` (built by code)."""
    tokenizer: str | None = None
    """Tokenizer directory or a real DeepSeek tokenizer name (e.g. `deepseek-v3`); default: the model's."""
    chat_template: str | None = None
    """A DeepSeek template name (deepseek-v3, deepseek-v3.1, deepseek-v3.1-thinking, deepseek-r1, r1-distill, …) or None."""
    force_template: bool = False
    """Train even when the token ids training gives a conversation differ from the ids the chat template gives the
    same conversation at inference (`dsft doctor MODEL_DIR` shows where); also `dsft train --force-template`."""
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
