"""Progress of the data stage's steps on a terminal (records, rate, ETA when the total is known); silent when piped."""

from __future__ import annotations

from typing import Any

from dsft.report.progress import bar


def step_bar(step: str, total: int | None = None) -> Any:
    """A progress bar for one step on stderr, shown only when stderr is a terminal.
    It is cleared when the step ends, so a finished stage leaves only its summary."""
    return bar(f"data {step}", total=total, unit=" records", unit_scale=True, leave=False, mininterval=0.25)
