"""Progress of the data stage's steps on a terminal (records, rate, ETA when the total is known); silent when piped."""

from __future__ import annotations

import shutil
import sys
from typing import Any


def step_bar(step: str, total: int | None = None) -> Any:
    """A progress bar for one step on stderr, shown only when stderr is a terminal (tqdm's `disable=None`).
    It is cleared when the step ends, so a finished stage leaves only its summary."""
    from tqdm import tqdm

    # a terminal that reports no size (a fresh pseudo-terminal, some CI runners) makes tqdm draw nothing at all
    size = shutil.get_terminal_size((100, 24))
    return tqdm(total=total, desc=f"data {step}", unit=" records", unit_scale=True, disable=None, leave=False,
                file=sys.stderr, mininterval=0.25, ncols=size.columns, nrows=size.lines)
