"""matplotlib for report PNGs: one headless set-up and one CJK font finder (Chinese labels need a CJK font)."""

from __future__ import annotations

import functools
import glob
import logging
from pathlib import Path
from typing import Any

# Families able to draw Chinese, best first, and where their files usually live (Linux, macOS, Windows).
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei",
                "Microsoft YaHei", "PingFang SC", "Source Han Sans SC", "Droid Sans Fallback")
CJK_FONT_GLOBS = ("/usr/share/fonts/**/NotoSansCJK-Regular.ttc", "/usr/share/fonts/**/*SansCJK*Regular*.tt[cf]",
                  "/usr/share/fonts/**/*CJK*.tt[cf]", "/usr/share/fonts/**/wqy*.tt[cf]",
                  "/usr/share/fonts/**/*Han*Sans*.[ot]t[cf]", "/usr/share/fonts/**/*Hei*.tt[cf]",
                  "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.tt[cf]", "C:/Windows/Fonts/simhei.ttf")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), with matplotlib's chatter kept to warnings."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def cjk_fonts() -> tuple[str, ...]:
    """Font families on this system that draw Chinese (registering .ttc files matplotlib skips); () when none."""
    from matplotlib import font_manager

    pyplot()
    have = {f.name for f in font_manager.fontManager.ttflist}
    found = [w for w in CJK_FAMILIES if w in have]
    if not found:
        for pattern in CJK_FONT_GLOBS:
            for path in sorted(glob.glob(pattern, recursive=True))[:8]:
                try:
                    font_manager.fontManager.addfont(path)
                    name = font_manager.FontProperties(fname=path).get_name()
                except Exception:  # a broken font file must not break a report
                    continue
                if name not in found:
                    found.append(name)
    return tuple(found)


def cjk_font() -> str | None:
    """The best CJK font family here, or None (then callers index their labels instead of drawing Chinese)."""
    fonts = cjk_fonts()
    return fonts[0] if fonts else None


def cjk_rc() -> dict[str, Any]:
    """rcParams for plt.rc_context that draw Chinese text with the CJK font (DejaVu Sans for the rest); {} without one."""
    fonts = cjk_fonts()
    return {"font.family": ["sans-serif"], "font.sans-serif": [*fonts, "DejaVu Sans"]} if fonts else {}


def save_png(fig, path: str | Path, *, dpi: int = 100) -> Path:
    """Write fig as PNG (tight layout) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=dpi)
    plt.close(fig)
    return path
