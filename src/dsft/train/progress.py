"""The console progress bar of `dsft train`: steps, rate, ETA and loss on a terminal; nothing when piped."""

from __future__ import annotations

import os
import sys

FALLBACK_SIZE = (100, 24)
"""Columns, lines for a terminal that reports no size (0 × 0, e.g. a fresh pseudo-terminal): tqdm would hide the bar."""


def progress_bar(*, total: int, initial: int, enabled: bool | None):
    """A tqdm bar on stderr. enabled=None: shown only when stderr is a terminal; True / False force it."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    shape = {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else \
        {"ncols": FALLBACK_SIZE[0], "nrows": FALLBACK_SIZE[1]}
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not show, file=sys.stderr,
                mininterval=0.5, **shape)
