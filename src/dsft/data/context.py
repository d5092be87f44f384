"""What the data pipeline's steps share: config, engine, output folder, the drop accounting and rejected.jsonl."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.data.progress import step_bar
from dsft.data.store import JsonlWriter, Store


class Timer:
    """Per-step wall-clock timings for the report."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.last = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.t[name] = round(self.t.get(name, 0.0) + now - self.last, 4)
        self.last = now


def rejected_row(rec: dict, reason: str, detail: str | None) -> dict:
    """The rejected.jsonl row of a valid record dropped by a step (quality, sampling, balancing …)."""
    return {"file": rec["source"]["file"], "line": rec["source"]["line"], "id": rec["id"], "reason": reason,
            "detail": detail, "record": rec}


@dataclass
class StageContext:
    """State of one data-stage run that every step reads or adds to (accounting: input = kept + Σ dropped)."""

    cfg: Config
    out_dir: Path
    engine: Any
    rejected: JsonlWriter
    streaming: bool = False
    dropped: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    labels_before: Counter[str] = field(default_factory=Counter)
    infos: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # report sections, in step order
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    n_input: int = 0
    timer: Timer = field(default_factory=Timer)

    @property
    def d(self) -> Any:
        return self.cfg.data

    def reject(self, row: dict, reason: str) -> None:
        self.rejected.write(row)
        self.dropped[reason] += 1

    def drop(self, rec: dict, reason: str, detail: str | None) -> None:
        self.reject(rejected_row(rec, reason, detail), reason)

    def count_dropped(self, reason: str, n: int) -> None:
        """Drops listed elsewhere (duplicates.jsonl): counted, not written to rejected.jsonl."""
        if n:
            self.dropped[reason] += n

    def map_parts(self, fn: Callable[[list[Any]], Any], items: list[Any]) -> list[Any]:
        """fn(batch) for each batch of data.batch_size items, on the engine; one result per batch, in order."""
        return self.engine.map_batches(fn, items, self.d.batch_size)

    def map_each(self, fn: Callable[[list[Any]], Any], items: list[Any]) -> list[Any]:
        """Like map_parts for a fn that returns one result per item: the per-item results, in order."""
        return [x for part in self.map_parts(fn, items) for x in part]

    def chunks(self, store: Store, step: str) -> Iterator[tuple[int, list[dict]]]:
        """The store's chunks, with a progress bar for the step on a terminal."""
        bar = step_bar(step, len(store))
        try:
            for start, chunk in store.chunks(self.d.batch_size):
                yield start, chunk
                bar.update(len(chunk))
            bar.refresh()  # the final count and rate, however short the step was
        finally:
            bar.close()
