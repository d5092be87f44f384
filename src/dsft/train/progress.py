"""The console progress bar of `dsft train`: steps, rate, ETA and loss on a terminal; nothing when piped."""

from __future__ import annotations

from typing import Any

from dsft.report.progress import bar


def progress_bar(*, total: int, initial: int, enabled: bool | None) -> Any:
    """A tqdm bar on stderr. enabled=None: shown only when stderr is a terminal; True / False force it."""
    return bar("train", total=total, initial=initial, unit="step", enabled=enabled)
