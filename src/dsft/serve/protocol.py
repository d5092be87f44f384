"""Request bodies of the seed's /generate and the OpenAI-compatible endpoints (validated → 400 naming the field).

Everything a request can get wrong is checked here, ranges included, before the request reaches the engine:
a value the engine could choke on (a seed outside 64 bits, an infinite temperature, 1,000 stop strings) is a 400.
What needs the tokenizer (token ids, prompt length in tokens) is checked in `dsft.serve.prompts`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# a seed is a 64-bit integer, signed or not (torch takes both; it is reduced modulo 2**64)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # a bound on the number itself; the context length is checked with the tokenizer

Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description="64-bit integer: same seed, same sample")]
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None


class _Body(BaseModel):
    # Unknown fields are ignored (as vLLM and OpenAI do); wrong types and ranges are rejected. Strict: what the
    # published schema says is what is accepted (no `true` for an integer, no "5" for a number); NaN and ±inf
    # (which Python's JSON reader would accept) are not numbers here.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False, strict=True)


def _stops(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)


class GenerateRequest(_Body):
    """The seed's body: {prompt, max_tokens=512, temperature=0.7} (+ optional top_p, seed, stop)."""

    prompt: StrictStr = Field(min_length=1)
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Stop = None
    model: str | None = None

    def stop_list(self) -> list[str]:
        return _stops(self.stop)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    seed: Seed | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted only to reject them clearly (400) instead of silently ignoring them
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    suffix: Any = None
    logit_bias: Any = None

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, v, info):
        if v in (None, False, [], {}, "none") or v == {"type": "text"}:
            return v
        raise ValueError(f"{info.field_name} is not supported by dsft serve (vLLM supports it: --engine vllm)")

    def stop_list(self) -> list[str]:
        return _stops(self.stop)


class ContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[int]
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v
