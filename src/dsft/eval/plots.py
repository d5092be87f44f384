"""PNG plots of the eval stage: training/eval loss curves and the per-class confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_FONT_GLOBS = ("/usr/share/fonts/**/*CJK*.tt[cf]", "/usr/share/fonts/**/wqy*.tt[cf]", "/usr/share/fonts/**/*Han*Sans*.[ot]t[cf]",
               "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc", "C:/Windows/Fonts/simhei.ttf")


def _cjk_font() -> list[str]:
    """Font families able to draw Chinese labels (registering .ttc files matplotlib skips); [] when none."""
    import glob

    from matplotlib import font_manager

    wanted = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei",
              "Microsoft YaHei", "PingFang SC", "Source Han Sans SC", "Droid Sans Fallback")
    have = {f.name for f in font_manager.fontManager.ttflist}
    if not any(w in have for w in wanted):
        for pattern in _FONT_GLOBS:
            for path in sorted(glob.glob(pattern, recursive=True))[:8]:
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        have = {f.name for f in font_manager.fontManager.ttflist}
    return [w for w in wanted if w in have]


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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def confusion_png(classes: Sequence[str], matrix: Sequence[Sequence[int]], path: str | Path, title: str) -> Path:
    """Plot a confusion matrix (rows = true class, columns = predicted) with counts in the cells."""
    plt = _plt()
    fonts = _cjk_font()
    n = max(len(classes), 1)
    size = min(2.5 + 0.4 * n, 7.5)
    ctx = {"font.family": ["sans-serif"], "font.sans-serif": [*fonts, "DejaVu Sans"]} if fonts else {}
    with plt.rc_context(ctx):
        fig, ax = plt.subplots(figsize=(size, size), dpi=100)
        ax.imshow(matrix if classes else [[0]], cmap="Blues")
        # Without a CJK font, label the axes with indices and list the classes in the title area.
        names = list(classes) if fonts else [str(i) for i in range(len(classes))]
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
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
        plt.close(fig)
    return path
