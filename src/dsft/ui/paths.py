"""Where the dashboard may read and write: run names, and files resolved strictly inside the runs directory."""

from __future__ import annotations

import re
from pathlib import Path

from dsft.errors import DsftError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UI_DIR = "ui"  # <run>/ui/: the config the dashboard launched, the job state and its log


class UiError(DsftError):
    """A request the dashboard refuses: bad run name, path outside the runs directory, invalid form."""


class NotFound(UiError):
    """The run or file does not exist."""


def check_run_name(name: str) -> str:
    """A run name is one folder name: letters, digits, '.', '_', '-'; never '..' or a path."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise UiError(f"run name {name!r}: expected 1-64 letters, digits, '.', '_' or '-' (no '/', no '..')")
    return name


def inside(root: Path, rel: str) -> Path:
    """root/rel resolved (symlinks followed); refused unless it stays inside root."""
    root = Path(root).resolve()
    if not isinstance(rel, str) or "\x00" in rel or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise UiError(f"path {rel!r}: expected a path relative to the run directory")
    p = (root / rel).resolve()
    if p != root and not p.is_relative_to(root):
        raise UiError(f"path {rel!r}: outside the runs directory (refused)")
    return p


def run_path(runs_root: Path, name: str, *, must_exist: bool = True) -> Path:
    """The folder of run `name` inside the runs directory."""
    p = inside(runs_root, check_run_name(name))
    if must_exist and not p.is_dir():
        raise NotFound(f"run {name!r} not found in {runs_root}")
    return p


def run_file(runs_root: Path, name: str, rel: str) -> Path:
    """A file of run `name` (e.g. 'eval/report.html'); refused when it resolves outside that run."""
    root = run_path(runs_root, name)
    p = inside(root, rel)
    if not p.is_file():
        raise NotFound(f"{name}/{rel}: no such file")
    return p
