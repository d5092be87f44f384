"""Per-sample filters of teacher traces: errors, truncation, format, length, repetition and language mix; each
returns the reason a sample is dropped (a short key + a detail) or None."""

from __future__ import annotations

import re
from typing import Any

from dsft.config.distill import VerifyConfig
from dsft.data.quality import char_repetition_ratio

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")
MATH = re.compile(r"\\[A-Za-z]+|\$[^$]*\$")  # LaTeX commands and $…$ are not words of a language

Reason = tuple[str, str]


def cjk_share(text: str) -> float | None:
    """CJK characters / (CJK characters + Latin letters), LaTeX left out; None for a text without letters."""
    text = MATH.sub(" ", text)
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    return cjk / (cjk + latin) if cjk + latin else None


def language_mismatch(question: str, text: str, threshold: float) -> str | None:
    """'zh question, en text' style detail when the text's language is not the question's, else None."""
    q, t = cjk_share(question), cjk_share(text)
    if q is None or t is None:
        return None
    q_zh, t_zh = q >= threshold, t >= threshold
    if q_zh == t_zh:
        return None
    return f"{'Chinese' if q_zh else 'English'} question, CJK share of the text {t:.2f} (threshold {threshold})"


def check_sample(s: dict[str, Any], question: str, v: VerifyConfig) -> Reason | None:
    """The first reason to drop a sample, in a fixed order (error, truncation, format, length, repetition,
    language); None when it passes. Correctness is checked after this (verify.py)."""
    if s.get("error"):
        return "teacher_error", s["error"]
    reasoning, answer = s.get("reasoning") or "", s.get("answer") or ""
    if s.get("finish_reason") == "length" or s.get("unclosed_think"):
        return "truncated", f"finish_reason {s.get('finish_reason')!r}, {len(reasoning) + len(answer)} characters"
    return _format(reasoning, answer, s, v) or _lengths(reasoning, answer, v) or _content(reasoning, answer, question, v)


def _format(reasoning: str, answer: str, s: dict[str, Any], v: VerifyConfig) -> Reason | None:
    if v.require_reasoning and s.get("reasoning") is None:
        return "no_reasoning", "no reasoning_content and no <think>…</think> block"
    if "<think>" in answer or "</think>" in answer or "</think>" in reasoning:
        return "bad_format", "a second think block (or a stray think tag)"
    if not answer.strip():
        return "empty_answer", "nothing after the reasoning"
    return None


def _lengths(reasoning: str, answer: str, v: VerifyConfig) -> Reason | None:
    checks = (("reasoning", reasoning, v.min_reasoning_chars if v.require_reasoning else 0, v.max_reasoning_chars),
              ("answer", answer, v.min_answer_chars, v.max_answer_chars))
    for name, text, lo, hi in checks:
        n = len(text.strip())
        if n < lo:
            return f"{name}_too_short", f"{n} characters < {lo}"
        if hi is not None and n > hi:
            return f"{name}_too_long", f"{n} characters > {hi}"
    return None


def _content(reasoning: str, answer: str, question: str, v: VerifyConfig) -> Reason | None:
    if v.max_repetition is not None:
        for name, text in (("reasoning", reasoning), ("answer", answer)):
            r = char_repetition_ratio(text)
            if r > v.max_repetition:
                return "repetitive", f"{name}: {r:.2f} of its character 10-grams repeat (max {v.max_repetition})"
    if v.language == "match":
        for name, text in (("reasoning", reasoning), ("answer", answer)):
            detail = language_mismatch(question, text, v.cjk_share)
            if detail:
                return "language_mix", f"{name}: {detail}"
    return None
