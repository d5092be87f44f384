"""PNG curves of an objective's per-step metrics (implicit rewards for DPO, reward / length / KL for GRPO)."""

from __future__ import annotations

from pathlib import Path


def plot_series(history: list[dict], keys: list[str], path: Path, *, title: str,
                band: dict[str, str] | None = None) -> None:
    """One line per key of the records' `objective` dict over steps; band {mean key: std key} shades ± std."""
    from dsft.report.plots import pyplot

    plt = pyplot()
    recs = [h for h in history if isinstance(h.get("objective"), dict) and "event" not in h]
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 1.8 * len(keys) + 0.6), dpi=100, sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(h["step"], h["objective"][key]) for h in recs if h["objective"].get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, lw=1)
            std_key = (band or {}).get(key)
            if std_key:
                sd = [h["objective"].get(std_key) or 0.0 for h in recs if h["objective"].get(key) is not None]
                ax.fill_between(xs, [y - d for y, d in zip(ys, sd, strict=True)],
                                [y + d for y, d in zip(ys, sd, strict=True)], alpha=0.2)
        ax.set_ylabel(key.split("/")[-1])
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
