"""Preference pairs and RL prompts → token ids (the DeepSeek chat template, as SFT encodes), with the same checks.

A pair is two `Encoded` sequences (prompt + chosen, prompt + rejected; labels on the answer incl. its end token),
so they pack and collate exactly like SFT samples. A prompt is the template's generation prompt (R1 templates add
their opening `<think>` there) plus what the reward functions need from the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsft.errors import DataError, TrainError
from dsft.train.encode import IGNORE, Encoded, EncodeReport, encode_messages


@dataclass
class PairExample:
    """One preference pair; `input_ids`/`labels` (both sequences back to back) feed fingerprint and lengths."""

    chosen: Encoded
    rejected: Encoded
    record_id: str = ""

    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    @property
    def n_labels(self) -> int:
        return self.chosen.n_labels + self.rejected.n_labels


@dataclass
class PromptExample:
    """One RL prompt: the rendered generation prompt's ids and the record the rewards read."""

    input_ids: list[int]
    record: dict[str, Any] = field(default_factory=dict)
    record_id: str = ""

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return 0


def prompt_messages(rec: dict[str, Any], n: int, source: str) -> list[dict[str, str]]:
    """The record's prompt turns (`prompt`, else `messages` up to the last assistant turn)."""
    msgs = rec.get("prompt")
    if msgs is None and isinstance(rec.get("messages"), list):
        msgs = rec["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
        msgs = msgs[:last]
    if isinstance(msgs, str):
        msgs = [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{source}: line {n}: key 'prompt': expected a non-empty list of {{role, content}} "
                        f"(run `dsft data prepare` with train.objective set)")
    return msgs


def _cut_prompt(ids: list[int], labels: list[int], max_prompt: int | None) -> tuple[list[int], list[int]]:
    """Keep at most max_prompt tokens before the first labelled token (the prompt's end)."""
    if not max_prompt:
        return ids, labels
    first = next((k for k, x in enumerate(labels) if x != IGNORE), len(labels))
    cut = max(0, first - max_prompt)
    return ids[cut:], labels[cut:]


def encode_answer(tok, prompt: list[dict[str, str]], answer: str, max_len: int
                  ) -> tuple[list[int], list[int], bool, int]:
    """prompt + one answer → (ids, labels on the answer and its end token, truncated, answer characters).

    As SFT encodes a conversation, unless the template rewrites the final answer: R1 templates drop everything
    up to `</think>`, which would train on the bare answer (or on nothing). Then the pair is encoded the way the
    model generates it: the generation prompt (ending in R1's `<think>\n`), the answer without the part the
    prompt already holds, and the end token.
    """
    ids, labels, truncated, chars = encode_messages(tok, [*prompt, {"role": "assistant", "content": answer}], max_len)
    if chars > len(answer):  # the answer survived rendering (its span is the answer + the end token)
        return ids, labels, truncated, chars
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    overlap = next((k for k in range(min(len(head), len(answer)), 0, -1) if head.endswith(answer[:k])), 0)
    tail = answer[overlap:] + (tok.eos_token or "")
    head_ids = list(tok(head, add_special_tokens=False)["input_ids"])
    tail_ids = list(tok(tail, add_special_tokens=False)["input_ids"])
    ids, labels = head_ids + tail_ids, [IGNORE] * len(head_ids) + tail_ids
    return ids[:max_len], labels[:max_len], len(ids) > max_len, len(tail)


def encode_pairs(tok, records: list[dict], max_len: int, *, max_prompt: int | None = None,
                 source: str = "train.jsonl") -> tuple[list[PairExample], EncodeReport]:
    """Encode every pair; drop (and count) pairs with an answer truncated away or identical answers."""
    rep = EncodeReport(total=len(records))
    out: list[PairExample] = []
    if not records:
        raise DataError(f"{source}: no preference pairs")
    for n, rec in enumerate(records, start=1):
        prompt = prompt_messages(rec, n, source)
        sides = []
        for key in ("chosen", "rejected"):
            text = rec.get(key)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{source}: line {n}: key '{key}': expected the non-empty answer text")
            ids, labels, truncated, chars = encode_answer(tok, prompt, text, max_len + (max_prompt or 0))
            ids, labels = _cut_prompt(ids, labels, max_prompt)
            ids, labels = ids[:max_len], labels[:max_len]
            rep.truncated += int(truncated or len(ids) < len(labels))
            rep.assistant_chars += chars
            sides.append(Encoded(ids, labels, str(rec.get("id", n))))
        pair = PairExample(sides[0], sides[1], str(rec.get("id", n)))
        if not pair.chosen.n_labels or not pair.rejected.n_labels:
            rep.drop("answer_truncated_away")
            continue
        if pair.chosen.input_ids == pair.rejected.input_ids:
            rep.drop("identical_answers")
            continue
        rep.assistant_tokens += pair.n_labels
        rep.tokens += len(pair.input_ids)
        out.append(pair)
    rep.kept = len(out)
    if rep.kept < 0.5 * rep.total:
        raise TrainError(f"{source}: only {rep.kept} of {rep.total} preference pairs survive tokenization "
                         f"(dropped {rep.dropped}); raise data.max_seq_length (now {max_len})")
    if rep.assistant_tokens * 12 < rep.assistant_chars:
        raise TrainError(f"{source}: answers of {rep.assistant_chars} characters encode to only "
                         f"{rep.assistant_tokens} tokens — the tokenizer is dropping text; fix it before training")
    return out, rep


def encode_prompts(tok, records: list[dict], max_prompt: int, *, source: str = "train.jsonl"
                   ) -> tuple[list[PromptExample], EncodeReport]:
    """Render each prompt with the generation prompt; drop (and count) prompts longer than max_prompt tokens."""
    rep = EncodeReport(total=len(records))
    out: list[PromptExample] = []
    if not records:
        raise DataError(f"{source}: no RL prompts")
    for n, rec in enumerate(records, start=1):
        msgs = prompt_messages(rec, n, source)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt:
            rep.drop("prompt_too_long")
            continue
        rid = str(rec.get("id", n))
        view = {"id": rid, "answer": rec.get("answer"), "meta": rec.get("meta") or {}, "prompt": msgs}
        out.append(PromptExample(ids, view, rid))
        rep.tokens += len(ids)
    rep.kept = len(out)
    if not out:
        raise TrainError(f"{source}: all {rep.total} prompts are longer than {max_prompt} tokens "
                         f"(data.max_seq_length − grpo.max_completion_length); raise data.max_seq_length")
    return out, rep
