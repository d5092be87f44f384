"""Number formatting for reports and tables: one place for missing values ("—"), percentages, counts, durations."""

from __future__ import annotations

from typing import Any

MISSING = "—"


def is_number(x: Any) -> bool:
    """A real int/float (not a bool, not None)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def fmt_num(x: Any, spec: str = "{:.4f}") -> str:
    """x formatted with a str.format spec (e.g. '{:+.2f} %'), or "—" when x is not a number."""
    return spec.format(x) if is_number(x) else MISSING


def fmt_pct(x: Any, digits: int = 1) -> str:
    """A fraction as a percentage: 0.344 → '34.4 %'; "—" when missing."""
    return f"{100 * x:.{digits}f} %" if is_number(x) else MISSING


def fmt_metric(x: Any) -> str:
    """A metric value: floats to 4 decimals (1 from 1000 up), other values as text, None as "—"."""
    if x is None:
        return MISSING
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"
    return str(x)


def fmt_count(n: float) -> str:
    """A large count with a unit: 1.2K, 7.0B, 671B (no decimals from 100 up)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return str(int(n))


def fmt_duration(s: float) -> str:
    """Seconds as s (under 2 min), min (under 2 h) or h."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
