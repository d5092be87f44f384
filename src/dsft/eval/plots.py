"""PNG plots of the eval stage: training/eval loss curves and the per-class confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.report.plots import cjk_rc, pyplot, save_png


def loss_series(log_rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{series: (steps, values)} for `loss` and `eval_loss` (and any other `*loss` key) found in log rows."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(log_rows):
        if row.get("event") not in (None, "eval"):  # nan_loss / early_stop / oom … rows are not curve points
            continue
        step = row.get("step", row.get("global_step", i))
        for k, v in row.items():
            if k.endswith("loss") and isinstance(v, int | float) and not isinstance(v, bool):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(float(step))
                ys.append(float(v))
    return series


def loss_curve_png(log_rows: Sequence[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Plot every loss series of a training log to path; None when the log holds no loss."""
    series = loss_series(log_rows)
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def confusion_png(classes: Sequence[str], matrix: Sequence[Sequence[int]], path: str | Path, title: str) -> Path:
    """Plot a confusion matrix (rows = true class, columns = predicted) with counts in the cells."""
    plt = pyplot()
    ctx = cjk_rc()
    n = max(len(classes), 1)
    size = min(2.5 + 0.4 * n, 7.5)
    with plt.rc_context(ctx):
        fig, ax = plt.subplots(figsize=(size, size), dpi=100)
        ax.imshow(matrix if classes else [[0]], cmap="Blues")
        # Without a CJK font, label the axes with indices and list the classes in the title area.
        names = list(classes) if ctx else [str(i) for i in range(len(classes))]
        ax.set_xticks(range(len(classes)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), names)
        peak = max((max(r) for r in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        return save_png(fig, path)
