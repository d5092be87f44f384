"""The two drivers of the data pipeline: records held in memory (a list) or streamed (a JSONL work file + offsets).

Every pipeline step reads a store chunk by chunk and builds the next one with `writer()` (records it changed) or
`select()` (records it kept), so both drivers run the same steps and write the same bytes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

# Records per chunk = batch_size × CHUNK_BATCHES: a whole number of engine batches (the batch steps see the same
# batches as one call over everything would) and of back-translation's batches of 8.
CHUNK_BATCHES = 8


class Store(Protocol):
    """What a pipeline step needs from the records it runs over."""

    def __len__(self) -> int: ...
    def chunks(self, batch_size: int) -> Iterator[tuple[int, list[dict]]]: ...
    def get(self, indices: Sequence[int]) -> list[dict]: ...
    def select(self, indices: Sequence[int]) -> Store: ...
    def writer(self) -> StoreWriter: ...


class StoreWriter(Protocol):
    """Builds a new store record by record."""

    def add(self, rec: dict) -> None: ...
    def finish(self) -> Store: ...


class MemoryStore:
    """In-memory driver: the records are a list."""

    def __init__(self, records: list[dict] | None = None):
        self.records = records if records is not None else []

    def __len__(self) -> int:
        return len(self.records)

    def chunks(self, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
        """(index of the first record, records) in order."""
        n = batch_size * CHUNK_BATCHES
        for start in range(0, len(self.records), n):
            yield start, self.records[start:start + n]

    def get(self, indices: Sequence[int]) -> list[dict]:
        return [self.records[i] for i in indices]

    def select(self, indices: Sequence[int]) -> MemoryStore:
        return MemoryStore(self.get(indices))

    def writer(self) -> MemoryStore:
        return MemoryStore()

    def add(self, rec: dict) -> None:
        self.records.append(rec)

    def finish(self) -> MemoryStore:
        return self


class FileStore:
    """Streaming driver: records in a JSONL work file under `work_dir`; in memory only one byte offset per record."""

    def __init__(self, work_dir: Path, path: Path | None = None, offsets: list[int] | None = None):
        self.work_dir = Path(work_dir)
        self.path = path
        self.offsets = offsets if offsets is not None else []
        self._fh: Any = None

    def __len__(self) -> int:
        return len(self.offsets)

    def _read(self, fh, i: int) -> dict:
        fh.seek(self.offsets[i])
        return json.loads(fh.readline())

    def chunks(self, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
        n = batch_size * CHUNK_BATCHES
        if not self.offsets:
            return
        with open(self.path, "rb") as fh:
            for start in range(0, len(self.offsets), n):
                yield start, [self._read(fh, i) for i in range(start, min(start + n, len(self.offsets)))]

    def get(self, indices: Sequence[int]) -> list[dict]:
        if not len(indices):
            return []
        with open(self.path, "rb") as fh:
            return [self._read(fh, i) for i in indices]

    def select(self, indices: Sequence[int]) -> FileStore:
        return FileStore(self.work_dir, self.path, [self.offsets[i] for i in indices])

    def writer(self) -> FileStore:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="records.", suffix=".jsonl", dir=self.work_dir)
        out = FileStore(self.work_dir, Path(name), [])
        out._fh = os.fdopen(fd, "wb")
        return out

    def add(self, rec: dict) -> None:
        self.offsets.append(self._fh.tell())
        self._fh.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")

    def finish(self) -> FileStore:
        self._fh.close()
        self._fh = None
        return self


def new_store(streaming: bool, work_dir: Path) -> MemoryStore | FileStore:
    """An empty store to read into: streaming (work files under work_dir) or in memory."""
    return FileStore(work_dir).writer() if streaming else MemoryStore()


class JsonlWriter:
    """Writes one output JSONL row by row into a temp file, renamed into place on close (never a torn file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self.fh = os.fdopen(fd, "w", encoding="utf-8")
        self.n = 0

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.n += 1

    def close(self) -> None:
        if self.fh.closed:
            return
        self.fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the partial file (the stage failed before finishing it)."""
        if not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
