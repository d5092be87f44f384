"""The console progress bar of `dsft train`: steps, rate, ETA and loss on a terminal; nothing when piped."""

from __future__ import annotations

import sys


def progress_bar(*, total: int, initial: int, enabled: bool | None):
    """A tqdm bar on stderr. enabled=None: shown only when stderr is a terminal; True / False force it."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not show, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)
