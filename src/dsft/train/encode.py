"""Chat records → token ids + labels (loss only on assistant tokens), with the checks that catch broken tokenizers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from dsft.errors import DataError, TrainError

IGNORE = -100


@dataclass
class Encoded:
    """One training example: token ids and labels (IGNORE outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]
    record_id: str = ""

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class EncodeReport:
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    assistant_chars: int = 0
    assistant_tokens: int = 0
    tokens: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _render(tok, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, character spans of every assistant turn incl. its end token)."""
    full = _render(tok, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
            start, end = len(prefix), len(upto)
        else:  # templates that rewrite history (e.g. R1 drops earlier <think>): locate the content itself
            content = m.get("content") or ""
            start = full.find(content, cursor)
            if start < 0 or not content:
                continue
            end = start + len(content)
            eos = tok.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def encode_messages(tok, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int], bool, int]:
    """Token ids + labels of one conversation, truncated to max_len → (ids, labels, truncated, assistant_chars)."""
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    j = 0
    for k, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s >= spans[j][0] and e <= spans[j][1] and e > s:
            labels[k] = ids[k]
    truncated = len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    chars = sum(e - s for s, e in spans)
    return ids, labels, truncated, chars


def encode_records(tok, records: list[dict[str, Any]], max_len: int, *, source: str = "train.jsonl") -> tuple[list[Encoded], EncodeReport]:
    """Encode every record; refuse a dataset that comes out empty, fully truncated or far shorter than its text."""
    rep = EncodeReport(total=len(records))
    out: list[Encoded] = []
    if not records:
        raise DataError(f"{source}: no training records")
    for n, rec in enumerate(records, start=1):
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{source}: line {n}: key 'messages': expected a non-empty list of {{role, content}}")
        if not any(m.get("role") == "assistant" and (m.get("content") or "").strip() for m in msgs):
            rep.drop("no_assistant_turn")
            continue
        ids, labels, truncated, chars = encode_messages(tok, msgs, max_len)
        ex = Encoded(ids, labels, str(rec.get("id", n)))
        if truncated:
            rep.truncated += 1
        if ex.n_labels == 0:
            rep.drop("no_assistant_tokens_after_truncation" if truncated else "assistant_encodes_to_nothing")
            continue
        rep.assistant_chars += chars
        rep.assistant_tokens += ex.n_labels
        rep.tokens += len(ids)
        out.append(ex)
    rep.kept = len(out)
    if not out:
        raise TrainError(f"{source}: all {rep.total} examples are empty after tokenization/truncation "
                         f"(dropped {rep.dropped}, max_seq_length={max_len}); check the tokenizer and data.max_seq_length")
    bad = rep.dropped.get("assistant_encodes_to_nothing", 0)
    if bad > 0.01 * rep.total:
        raise TrainError(f"{source}: {bad} of {rep.total} assistant turns encode to no tokens — the tokenizer loses text "
                         f"(see transformers #45488); fix or upgrade the tokenizer")
    if rep.kept < 0.5 * rep.total:
        raise TrainError(f"{source}: only {rep.kept} of {rep.total} examples survive tokenization (dropped {rep.dropped}); "
                         f"raise data.max_seq_length (now {max_len})")
    # any real tokenizer gives ≥ 1 token per ~6 characters (Chinese ≈ 1–1.5, English ≈ 4); far fewer means lost text
    if rep.assistant_tokens * 12 < rep.assistant_chars:
        raise TrainError(f"{source}: assistant text of {rep.assistant_chars} characters encodes to only "
                         f"{rep.assistant_tokens} tokens — the tokenizer is dropping text; fix it before training")
    return out, rep


def dataset_fingerprint(examples: list[Encoded]) -> str:
    """A hash of the encoded dataset (ids + labels, in order): resume refuses a changed dataset."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels], separators=(",", ":")).encode())
    return h.hexdigest()[:16]
