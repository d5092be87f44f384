"""Train/eval/test split, stratified by label and deterministic; a shuffle-buffer streaming variant for big files."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DataError


def _sizes(n: int, test_size: float, eval_size: float) -> tuple[int, int]:
    n_test = round(n * test_size)
    if n_test == 0 and n >= 3:
        n_test = 1
    n_eval = round(n * eval_size) if eval_size > 0 else 0
    if eval_size > 0 and n_eval == 0 and n >= 4:
        n_eval = 1
    return n_test, min(n_eval, max(0, n - n_test - 1))


def assign_splits(labels: list[str | None], test_size: float, eval_size: float, seed: int) -> list[str]:
    """The split ("train", "test" or "eval") of each record from its label alone: each class contributes
    round(n·test_size) to test (≥ 1 when it has ≥ 3) and round(n·eval_size) to eval (≥ 1 when it has ≥ 4),
    chosen by a shuffle seeded with (seed, label). Records without a label form one class."""
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(str(lab), []).append(i)
    where = ["train"] * len(labels)
    for label in sorted(groups):
        idx = list(groups[label])
        random.Random(f"{seed}:{label}").shuffle(idx)
        n_test, n_eval = _sizes(len(idx), test_size, eval_size)
        for k, i in enumerate(idx):
            where[i] = "test" if k < n_test else ("eval" if k < n_test + n_eval else "train")
    return where


def stratified_split(records: list[dict], test_size: float, eval_size: float, seed: int
                     ) -> tuple[list[dict], list[dict], list[dict]]:
    """In memory: `assign_splits` by each record's label; input order kept within each split."""
    out: dict[str, list[dict]] = {"train": [], "test": [], "eval": []}
    for r, split in zip(records, assign_splits([r.get("label") for r in records], test_size, eval_size, seed), strict=True):
        out[split].append(r)
    return out["train"], out["test"], out["eval"]


def shuffle_buffer(items: Iterable[Any], buffer: int, seed: int) -> Iterator[Any]:
    """Approximate shuffle of a stream with a fixed-size buffer (as tf.data / the seed describe); deterministic."""
    rng = random.Random(seed)
    buf: list[Any] = []
    for x in items:
        if len(buf) < buffer:
            buf.append(x)
            continue
        k = rng.randrange(buffer)
        yield buf[k]
        buf[k] = x
    rng.shuffle(buf)
    yield from buf


class StreamSplitter:
    """Assigns streamed records to train/test/eval so every label's running shares track test_size/eval_size."""

    def __init__(self, test_size: float, eval_size: float):
        self.test_size, self.eval_size = test_size, eval_size
        self.seen: dict[str, int] = {}
        self.test: dict[str, int] = {}
        self.eval: dict[str, int] = {}

    def assign(self, rec: dict) -> str:
        lab = str(rec.get("label"))
        n = self.seen[lab] = self.seen.get(lab, 0) + 1
        if self.test.get(lab, 0) < round(n * self.test_size):
            self.test[lab] = self.test.get(lab, 0) + 1
            return "test"
        if self.eval_size > 0 and self.eval.get(lab, 0) < round(n * self.eval_size):
            self.eval[lab] = self.eval.get(lab, 0) + 1
            return "eval"
        return "train"


def stream_split(records: Iterable[dict], test_size: float, eval_size: float, seed: int, buffer: int = 10_000
                 ) -> Iterator[tuple[str, dict]]:
    """(split, record) for a stream: shuffle buffer, then the running stratified assignment. Memory: `buffer` records."""
    sp = StreamSplitter(test_size, eval_size)
    for rec in shuffle_buffer(records, buffer, seed):
        yield sp.assign(rec), rec


def stream_split_file(src: Path, out_dir: Path, test_size: float, eval_size: float, seed: int, buffer: int = 10_000
                      ) -> dict[str, int]:
    """Split a JSONL file larger than memory into out_dir/{train,test,eval}.jsonl; returns the counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = {s: open(out_dir / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "test", "eval")}
    counts = dict.fromkeys(handles, 0)

    def rows() -> Iterator[dict]:
        with open(src, encoding="utf-8") as fh:
            for k, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{src}:{k}: not valid JSON ({err.msg}, column {err.colno})") from err

    try:
        for split, rec in stream_split(rows(), test_size, eval_size, seed, buffer):
            handles[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[split] += 1
    finally:
        for h in handles.values():
            h.close()
    return counts


def split_jsonl(src: Path, out: Path, *, test_size: float = 0.1, eval_size: float = 0.0, seed: int = 42,
                buffer: int = 10_000, force: bool = False) -> dict[str, int]:
    """`dsft data split`: check the arguments, then `stream_split_file`."""
    from dsft.errors import OverwriteError

    if not src.exists():
        raise DataError(f"{src}: file not found")
    if not (0 < test_size < 1 and 0 <= eval_size < 1 and test_size + eval_size < 1):
        raise DataError(f"--test-size {test_size} / --eval-size {eval_size}: expected shares that sum below 1")
    if any((out / f"{s}.jsonl").exists() for s in ("train", "test", "eval")) and not force:
        raise OverwriteError(f"{out} already holds split files; pass --force to overwrite them")
    return stream_split_file(src, out, test_size, eval_size, seed, buffer)
