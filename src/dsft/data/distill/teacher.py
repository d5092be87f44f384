"""The teacher client: one chat completion per sample from an OpenAI-compatible endpoint (httpx), with retries
and backoff on 408/409/429/5xx (a `Retry-After` header wins), and the reasoning kept apart from the answer."""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsft.config.distill import TeacherConfig
from dsft.errors import ConfigError, DsftError

RETRY_STATUS = frozenset({408, 409, 429})
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TeacherError(DsftError):
    """The teacher refuses the whole run (bad key, unknown model or URL, every request rejected)."""


class RetriesExhausted(Exception):
    """One request kept failing with retryable errors; its prompt stays pending for the next run."""


class BadRequest(Exception):
    """The teacher rejected one request (4xx other than 401/403/404/408/409/429)."""


@dataclass
class Stats:
    """What this session's requests cost and met: retries by cause, tokens, seconds waited."""

    requests: int = 0
    retries: int = 0
    retry_causes: dict[str, int] = field(default_factory=dict)
    waited_s: float = 0.0
    ok: int = 0

    def retried(self, cause: str, delay: float) -> None:
        self.retries += 1
        self.retry_causes[cause] = self.retry_causes.get(cause, 0) + 1
        self.waited_s += delay


def api_key(cfg: TeacherConfig) -> str | None:
    """The key from the environment variable the config names (never from the config itself)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"distill.teacher.api_key_env: the environment variable {cfg.api_key_env} is not set "
                          f"(export {cfg.api_key_env}=... before running)")
    return key


def split_think(content: str) -> tuple[str | None, str, bool]:
    """(reasoning or None, answer, unclosed) of a content that may hold `<think>…</think>`; the opening tag may
    be missing (R1's template puts it in the prompt). unclosed: the text opened a think block and never closed it."""
    if THINK_CLOSE in content:
        before, _, after = content.partition(THINK_CLOSE)
        before = before.strip()
        if before.startswith(THINK_OPEN):
            before = before[len(THINK_OPEN):]
        return before.strip(), after.strip(), False
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].strip(), "", True
    return None, content.strip(), False


def parse_choice(body: dict[str, Any]) -> dict[str, Any]:
    """The sample of a chat.completion body: reasoning (`reasoning_content`, vLLM's `reasoning`, or the
    `<think>` block of the content), answer, finish_reason, usage (estimated from characters when absent)."""
    choice = (body.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        source, answer, unclosed = "reasoning_content", content.strip(), False
        reasoning = reasoning.strip()
    else:
        reasoning, answer, unclosed = split_think(content)
        source = "think_tags" if reasoning is not None else None
    usage = body.get("usage") or {}
    tokens = {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
              "completion_tokens": int(usage.get("completion_tokens") or 0)}
    if not usage:  # a server without usage: a rough count (≈ 2 characters a token) so the budget still works
        tokens = {"prompt_tokens": 0, "completion_tokens": (len(content) + len(reasoning or "")) // 2 + 1,
                  "estimated": True}
    return {"reasoning": reasoning, "answer": answer, "finish_reason": choice.get("finish_reason"),
            "reasoning_source": source, "unclosed_think": unclosed, "usage": tokens, "error": None}


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    return " ".join(str(msg or resp.text or resp.reason_phrase).split())[:200]


class Teacher:
    """Sends one chat completion per call; the caller bounds concurrency."""

    def __init__(self, cfg: TeacherConfig, client: httpx.AsyncClient, key: str | None):
        self.cfg = cfg
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.stats = Stats()
        self.url = f"{cfg.base_url}/chat/completions"

    def body(self, messages: list[dict[str, str]], k: int) -> dict[str, Any]:
        c = self.cfg
        body: dict[str, Any] = {"model": c.model, "messages": messages, "max_tokens": c.max_tokens, "stream": False}
        if c.temperature is not None:
            body["temperature"] = c.temperature
        if c.top_p is not None:
            body["top_p"] = c.top_p
        if c.seed is not None:
            body["seed"] = c.seed + k
        return {**body, **c.extra_body}

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return min(after, self.cfg.max_retry_after_s)
        return min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    async def sample(self, messages: list[dict[str, str]], k: int) -> dict[str, Any]:
        """One sample (k = its index within the prompt); RetriesExhausted, BadRequest or TeacherError."""
        body = self.body(messages, k)
        for attempt in range(self.cfg.max_retries + 1):
            self.stats.requests += 1
            after, cause = None, ""
            try:
                resp = await self.client.post(self.url, json=body, headers=self.headers, timeout=self.cfg.timeout_s)
            except httpx.TimeoutException:
                cause = "timeout"
            except httpx.TransportError as err:
                cause = f"connection ({type(err).__name__})"
            else:
                if resp.status_code == 200:
                    try:
                        sample = parse_choice(resp.json())
                    except (ValueError, AttributeError, IndexError, TypeError):
                        cause = "malformed response"
                    else:
                        self.stats.ok += 1
                        return {**sample, "attempts": attempt + 1}
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    cause, after = str(resp.status_code), retry_after(resp.headers)
                else:
                    self.refuse(resp)
                    raise BadRequest(f"{resp.status_code}: {error_text(resp)}")
            if attempt == self.cfg.max_retries:
                raise RetriesExhausted(f"{cause} after {attempt + 1} attempts")
            wait = self.delay(attempt, after)
            self.stats.retried(cause, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def refuse(self, resp: httpx.Response) -> None:
        """401/403/404 stop the run: every request would fail the same way."""
        code = resp.status_code
        if code in (401, 403):
            hint = (f"check the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env
                    else "set distill.teacher.api_key_env to the variable holding the key")
            raise TeacherError(f"teacher {self.url}: {code} {error_text(resp)} — {hint}")
        if code == 404:
            raise TeacherError(f"teacher {self.url}: 404 {error_text(resp)} — check distill.teacher.base_url "
                               f"(up to /v1) and distill.teacher.model ({self.cfg.model!r})")
