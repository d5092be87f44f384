"""Chat records → token ids + labels (loss only on assistant tokens, each turn after its inference prompt), with the checks that catch broken tokenizers."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from dsft.errors import DataError, TrainError
from dsft.model.chat import Piece, training_rows
from dsft.model.parity import CONVERSATIONS, TRAIN, ParityTable, check_parity

log = logging.getLogger("dsft.train")

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


def _piece_ids(tok, piece: Piece, think_in_loss: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one piece (tokenized on its own: the prompt is tokenized alone at inference too)."""
    if not piece.trained:
        return list(tok(piece.text, add_special_tokens=False)["input_ids"]), []
    enc = tok(piece.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = list(ids)
    if piece.think is not None and not think_in_loss:  # data.think_in_loss: false masks the <think>…</think> block
        s0, e0 = piece.think
        # a token that starts inside the block is masked (with <think>/</think> as single tokens: exactly the block)
        labels = [IGNORE if s0 <= s < e0 else lab for lab, (s, _) in zip(labels, enc["offset_mapping"], strict=True)]
    return ids, labels


def encode_rows(tok, messages: list[dict[str, Any]], max_len: int, *,
                think_in_loss: bool = True) -> list[tuple[list[int], list[int], bool, int]]:
    """The training rows of one conversation (see dsft.model.chat), each (ids, labels, truncated, assistant_chars).

    Every assistant turn follows exactly the token ids inference gives its prompt; templates whose history drops the
    think block (R1) train each turn after that turn's own prompt, so a multi-turn conversation may give several rows."""
    out = []
    for row in training_rows(tok, messages):
        ids: list[int] = []
        labels: list[int] = []
        chars = 0
        for piece in row:
            pids, plabels = _piece_ids(tok, piece, think_in_loss)
            ids += pids
            labels += plabels if piece.trained else [IGNORE] * len(pids)
            chars += len(piece.text) if piece.trained else 0
        truncated = len(ids) > max_len
        if truncated:
            ids, labels = ids[:max_len], labels[:max_len]
        out.append((ids, labels, truncated, chars))
    return out


def encode_messages(tok, messages: list[dict[str, Any]], max_len: int, *,
                    think_in_loss: bool = True) -> tuple[list[int], list[int], bool, int]:
    """The row that trains the conversation's last assistant turn → (ids, labels, truncated, assistant_chars)."""
    rows = encode_rows(tok, messages, max_len, think_in_loss=think_in_loss)
    return rows[-1] if rows else ([], [], False, 0)


def parity_row(tok, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of the row training the conversation's last turn, untruncated (the template parity check's
    train path)."""
    ids, labels, _, _ = encode_messages(tok, messages, 1 << 30)
    return ids, labels


def check_template_parity(tok, records: list[dict[str, Any]], *, template: str, force: bool) -> ParityTable:
    """Refuse to train when training ids differ from the chat template's inference ids (unless forced).

    Checked on dsft's probe conversations (single/multi-turn, system, thinking, tool call) and the first record."""
    convs = dict(CONVERSATIONS)
    first = next((r.get("messages") for r in records if isinstance(r.get("messages"), list)), None)
    if first and any(m.get("role") == "assistant" for m in first):
        convs["your data, record 1"] = first[: max(i for i, m in enumerate(first) if m.get("role") == "assistant") + 1]
    table = check_parity(tok, {TRAIN: parity_row}, template=template, conversations=convs)
    if not table.ok:
        line = table.failure_line()
        if not force:
            raise TrainError(f"{line}; fix the chat template, or set model.force_template: true "
                             f"(dsft train --force-template) to train anyway")
        log.warning("dsft train: %s (training anyway: model.force_template)", line)
    return table


def encode_records(tok, records: list[dict[str, Any]], max_len: int, *, source: str = "train.jsonl",
                   think_in_loss: bool = True) -> tuple[list[Encoded], EncodeReport]:
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
        rows = encode_rows(tok, msgs, max_len, think_in_loss=think_in_loss) or [([], [], False, 0)]
        for k, (ids, labels, truncated, chars) in enumerate(rows):
            rid = str(rec.get("id", n))
            ex = Encoded(ids, labels, rid if len(rows) == 1 else f"{rid}#{k + 1}")
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
