"""`distill:` section — sample reasoning traces from a teacher, verify and filter them, mix them (docs/distill.md).

`dsft data distill CONFIG` reads the prompts of `distill.input`, asks `distill.teacher` (any OpenAI-compatible
endpoint) for `samples_per_prompt` answers each, keeps the correct and clean ones and mixes them with non-reasoning
records at `distill.mix.reasoning_share`. The API key is read from the environment variable named in
`teacher.api_key_env`, never from the config file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from dsft.config.base import Section
from dsft.config.preference import RewardSpec


class TeacherConfig(Section):
    """The teacher: an OpenAI-compatible `/chat/completions` endpoint (dsft serve, vLLM, DeepSeek's API, …)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Up to and including `/v1` (DeepSeek's API: https://api.deepseek.com/v1)."""
    model: str = "default"
    """The `model` field of each request (deepseek-reasoner, the served model name, …)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (e.g. DEEPSEEK_API_KEY); None sends no key."""
    max_tokens: int = Field(8192, gt=0)
    """Completion tokens per sample (reasoning + answer). R1-style traces need thousands."""
    temperature: float | None = Field(0.6, ge=0)
    """DeepSeek's recommendation for R1 (0.5–0.7); None leaves it to the server."""
    top_p: float | None = Field(0.95, gt=0, le=1)
    seed: int | None = None
    """Sent as `seed` + sample index when set (vLLM and dsft serve honour it; DeepSeek's API ignores it)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """More request fields, sent as they are (e.g. {top_k: 20} for vLLM)."""
    concurrency: int = Field(8, ge=1, le=1024)
    """Requests in flight at once."""
    timeout_s: float = Field(600.0, gt=0)
    """Per request (reasoning models think for minutes)."""
    max_retries: int = Field(6, ge=0)
    """Retries of one request on 408/409/429/5xx, timeouts and dropped connections."""
    backoff_s: float = Field(1.0, ge=0)
    """First retry delay; doubled each retry (with jitter), capped at max_backoff_s. A `Retry-After` header wins."""
    max_backoff_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(600.0, ge=0)
    """Longest `Retry-After` honoured; a server asking for more is waited this long."""

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class BudgetConfig(Section):
    """Stop cleanly when the tokens or the cost spent reach a limit (counted from the teacher's `usage`)."""

    max_tokens: int | None = Field(None, gt=0)
    """Prompt + completion tokens over the whole output (across resumed runs)."""
    max_cost: float | None = Field(None, gt=0)
    """In the currency of the prices below."""
    input_price_per_million: float = Field(0.0, ge=0)
    output_price_per_million: float = Field(0.0, ge=0)
    currency: str = "USD"


class TraceDedupConfig(Section):
    """MinHash near-duplicate removal of the kept traces (reasoning + answer), as `data.near_dedup` does records."""

    enabled: bool = True
    threshold: float = Field(0.9, gt=0, lt=1)
    ngram: int = Field(5, ge=1, le=64)
    word_ngram: int = Field(3, ge=1, le=32)
    num_perm: int = Field(128, ge=8, le=1024)
    seed: int = 1


class VerifyConfig(Section):
    """Which samples are kept: correct (reward functions against the reference) and clean (filters)."""

    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric")])
    """The same functions as `grpo.rewards` (dsft.rewards: exact, numeric, boxed, choice, regex, json_schema,
    think_format, length, or `module:function`), plus `contains`. An empty list checks no correctness."""
    min_reward: float = 1.0
    """A sample is correct when Σ weight × reward ≥ this."""
    reference: str = "answer"
    """Where the reference answer comes from: `answer` (the record's answer), `label`, or any field of the record."""
    require_reasoning: bool = True
    """Drop a sample without a reasoning trace (no `reasoning_content` and no `<think>…</think>`)."""
    min_reasoning_chars: int = Field(1, ge=0)
    max_reasoning_chars: int | None = Field(None, gt=0)
    min_answer_chars: int = Field(1, ge=0)
    max_answer_chars: int | None = Field(None, gt=0)
    max_repetition: float | None = Field(0.5, gt=0, le=1)
    """Drop when more than this share of the trace's character 10-grams are repeats (looping generations)."""
    language: Literal["match", "off"] = "match"
    """match: a Chinese question needs a Chinese reasoning and answer (and an English one English ones)."""
    cjk_share: float = Field(0.5, gt=0, lt=1)
    """A text is Chinese when CJK characters make up at least this share of its letters (CJK + Latin)."""
    max_per_prompt: int | None = Field(None, ge=1)
    """Keep at most this many correct samples per prompt (the first ones); None keeps all."""
    dedup: TraceDedupConfig = Field(default_factory=TraceDedupConfig)


class MixConfig(Section):
    """Reasoning records + non-reasoning records (R1's empty think block) at a stated share."""

    non_reasoning: str | list[str] | None = None
    """SFT file(s) whose answers become non-reasoning records (`<think>\\n\\n</think>\\n\\n` + answer); None: only
    the distilled records."""
    format: Literal["auto", "seed", "alpaca", "sharegpt", "openai", "csv", "text"] = "auto"
    encoding: str = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    reasoning_share: float = Field(0.75, gt=0, le=1)
    """Share of reasoning records in the mix (R1's SFT set: 600 k reasoning + 200 k non-reasoning = 0.75)."""
    strategy: Literal["downsample", "upsample"] = "downsample"
    """Reach the share by sampling the larger side down (nothing repeated), or by repeating the smaller side."""
    seed: int = 42


class DistillConfig(Section):
    """`dsft data distill`: prompts → teacher samples → verified traces → mixed training records."""

    input: str | list[str] | None = None
    """Prompt file(s): any SFT format dsft reads (the prompt is the conversation up to the last answer), or RL
    prompt files `{prompt, answer}` (format rl; `embedded:math_zh`)."""
    format: Literal["auto", "seed", "alpaca", "sharegpt", "openai", "csv", "text", "rl"] = "auto"
    encoding: str = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    label_field: str | None = "domain"
    system_prompt: str | None = None
    """A system turn put before every prompt (R1 recommends none: put instructions in the user turn)."""
    prompt_template: str | None = None
    """Rewrites the last user turn; keys {prompt} (that turn), {question}, {context}; e.g.
    "{prompt}\\n请一步步推理，并把最终答案写在\\\\boxed{{}}中。"."""
    max_prompts: int | None = Field(None, gt=0)
    """Use at most this many prompts (a deterministic sample by seed, in file order)."""
    seed: int = 42
    samples_per_prompt: int = Field(4, ge=1, le=64)
    """N: teacher samples per prompt (one request each)."""
    output: str | None = None
    """Output folder; default `<run_dir>/distill`."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
