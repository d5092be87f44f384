"""The run directory: one sub-folder per stage, each with its outputs and a manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsft.errors import DsftError, OverwriteError

STAGES = ("plan", "data", "train", "eval", "export", "serve")


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write obj as pretty UTF-8 JSON atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: Any) -> int:
    """Write an iterable of dicts as JSONL atomically; returns the number of rows."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file written by dsft (one JSON object per line)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


class RunDir:
    """A run directory: `<root>/<stage>/manifest.json` plus each stage's outputs."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, stage: str, *, create: bool = True) -> Path:
        d = self.root / stage
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def prepare_stage(self, stage: str, *, force: bool) -> Path:
        """Return an empty stage folder; refuse to overwrite finished output unless force."""
        d = self.root / stage
        if (d / "manifest.json").exists():
            if not force:
                raise OverwriteError(f"{d} already holds a finished '{stage}' stage; pass --force to overwrite it")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest_path(self, stage: str) -> Path:
        return self.root / stage / "manifest.json"

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> Path:
        p = self.manifest_path(stage)
        atomic_write_json(p, {"stage": stage, **manifest})
        return p

    def has(self, stage: str) -> bool:
        return self.manifest_path(stage).exists()

    def read_manifest(self, stage: str) -> dict[str, Any]:
        p = self.manifest_path(stage)
        if not p.exists():
            raise DsftError(f"{p} not found: run `dsft {stage}` first (stage '{stage}' has no output in {self.root})")
        return json.loads(p.read_text(encoding="utf-8"))


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside out_dir; on success it replaces out_dir, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
