"""Console progress bars for every long stage: tqdm on stderr when it is a terminal, nothing when piped."""

from __future__ import annotations

import os
import sys
from typing import Any

FALLBACK_SIZE = (100, 24)
"""Columns, lines for a terminal that reports no size (0 × 0, e.g. a fresh pseudo-terminal): tqdm would draw nothing."""


def bar(desc: str, *, total: int | None = None, unit: str = "it", initial: int = 0, enabled: bool | None = None,
        leave: bool = True, unit_scale: bool = False, mininterval: float = 0.5) -> Any:
    """A tqdm bar on stderr. enabled=None: shown only when stderr is a terminal; True / False force it."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        columns, lines = 0, 0
    if columns <= 0 or lines <= 0:
        columns, lines = FALLBACK_SIZE
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, disable=not show,
                leave=leave, file=sys.stderr, mininterval=mininterval, ncols=columns, nrows=lines)
