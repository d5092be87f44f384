"""data_report.md and its PNG histograms (lengths in characters and tokens, labels before/after)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsft.report.plots import cjk_font, pyplot

log = logging.getLogger("dsft.data")
def _ascii(s: str) -> bool:
    return all(ord(c) < 128 for c in s)


def plot_histograms(by_unit: dict[str, dict[str, list[int]]], path: Path, title: str) -> Path | None:
    """Histograms of lengths: one row per unit (chars, tokens), one panel per field."""
    plt = pyplot()
    rows = [(unit, [k for k, v in d.items() if v]) for unit, d in by_unit.items()]
    rows = [(u, f) for u, f in rows if f]
    if not rows:
        return None
    ncol = max(len(f) for _, f in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.6 * ncol, 2.8 * len(rows)), squeeze=False)
    for r, (unit, fields) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(fields):
                ax.axis("off")
                continue
            ax.hist(by_unit[unit][fields[c]], bins=40, color="#4C72B0" if unit == "chars" else "#DD8452")
            ax.set_title(f"{fields[c]} ({unit})", fontsize=9)
            ax.set_ylabel("records", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_labels(dists: dict[str, dict[str, int]], path: Path, title: str) -> tuple[Path | None, dict[str, str]]:
    """Grouped bars of label counts per stage (before/after/...). Without a CJK font labels become L1, L2 …
    and the returned legend maps them back to the names."""
    import numpy as np

    plt = pyplot()

    labels = sorted({k for d in dists.values() for k in d if k != "None"}, key=lambda k: -max(d.get(k, 0) for d in dists.values()))
    if not labels:
        return None, {}
    font = cjk_font()
    legend: dict[str, str] = {}
    ticks = labels
    if not all(_ascii(x) for x in labels) and font is None:
        legend = {f"L{i + 1}": lab for i, lab in enumerate(labels)}
        ticks = list(legend)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) * len(dists) / 2 + 3), 3.8))
    x = np.arange(len(labels))
    w = 0.8 / len(dists)
    for k, (name, d) in enumerate(dists.items()):
        ax.bar(x + k * w - 0.4 + w / 2, [d.get(lab, 0) for lab in labels], w, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(ticks, rotation=45, ha="right", fontfamily=[font, "DejaVu Sans"] if font else None)
    ax.set_ylabel("records")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path, legend


def build_report(ctx, summary) -> dict[str, Any]:
    """data_report.json (without lengths and timings): accounting, inputs, label distributions, the steps' sections.
    ctx: the stage's StageContext; summary: the SplitSummary of the written splits (None when nothing was kept)."""
    d = ctx.d
    s = summary
    kept = s.kept if s else 0
    counts = {"input": ctx.n_input, "kept": kept, "dropped": dict(sorted(ctx.dropped.items())),
              "train": s.n_train if s else 0, "test": s.sizes["test"] if s else 0, "eval": s.sizes["eval"] if s else 0,
              "derived": s.derived if s else 0}
    empty: dict[str, int] = {}
    report: dict[str, Any] = {
        "counts": counts,
        "accounting_holds": ctx.n_input == kept + sum(ctx.dropped.values()),
        "engine": ctx.engine.name,
        **({"streaming": True} if ctx.streaming else {}),
        "files": ctx.infos,
        "label_field": d.label_field,
        "train_composition": dict(sorted(s.composition.items())) if s else empty,
        "labels": {"before": dict(sorted(ctx.labels_before.items())),
                   "after": dict(sorted(s.labels_after.items())) if s else empty,
                   **{k: dict(sorted(s.labels[k].items())) if s else empty for k in ("train", "test", "eval")}},
        "eval_split": {"records": counts["eval"], "eval_size": d.eval_size, "seed": d.seed,
                       "stratified_by": d.label_field},
        "pii": dict(sorted(ctx.pii.items())),
    }
    extra = dict(ctx.extra)
    if "near_dedup" in extra:
        extra["near_dedup"] = dict(extra["near_dedup"])
        report["near_dup_examples"] = extra["near_dedup"].pop("examples")
    report.update(extra)
    return report


def lengths_and_plots(report: dict, cfg, out_dir: Path, chars: dict[str, list[int]],
                      tokens: dict[str, list[int]] | None, token_error: str | None) -> None:
    """Length statistics of the kept records (characters, and tokens when they could be counted) and the PNG plots."""
    from dsft.data.stats import length_stats
    from dsft.data.tokens import tokenizer_for

    report["lengths_chars"] = {k: length_stats(v) for k, v in chars.items()}
    if token_error is None:
        report["tokenizer"] = tokenizer_for(cfg)
    else:
        report["tokenizer"] = None
        report["tokenizer_error"] = token_error
        tokens = {}
    report["lengths_tokens"] = {k: length_stats(v) for k, v in (tokens or {}).items()}
    if not cfg.data.report_plots:
        return
    try:
        plots = {}
        if plot_histograms({"chars": chars, "tokens": tokens or {}}, out_dir / "lengths.png", "lengths of the kept records"):
            plots["lengths (characters and tokens)"] = "lengths.png"
        lab = report["labels"]
        p, legend = plot_labels({"before": lab["before"], "after cleaning": lab["after"], "train": lab["train"]},
                                out_dir / "labels.png", f"labels ({report['label_field']}) before/after")
        if p:
            plots["labels before/after"] = "labels.png"
            if legend:
                report["plot_label_legend"] = legend
        report["plots"] = plots
    except Exception as err:  # no matplotlib backend / font problems: the report still gets written
        report["plots"] = {}
        report["plot_error"] = f"{type(err).__name__}: {err}"


def render_md(rep: dict[str, Any]) -> str:
    """data_report.md: accounting, inputs, drops by reason, dedup, label skew before → after, lengths, timings, plots."""
    c = rep["counts"]
    dropped = c["dropped"]
    lines = ["# dsft data report", "",
             f"**input {c['input']} = kept {c['kept']} + dropped {sum(dropped.values())}** "
             f"(accounting holds: {rep['accounting_holds']})", "",
             f"Split: train {c['train']} (+{c['derived']} derived classification records), test {c['test']}, eval {c['eval']}."
             f" Engine: {rep.get('engine', 'local')}.", ""]
    ev = rep.get("eval_split")
    if ev:
        how = f"stratified by `{ev['stratified_by']}`" if ev["stratified_by"] else "not stratified (no label field)"
        lines += [f"Eval split: {ev['records']} records (data.eval_size {ev['eval_size']}, {how}, seed {ev['seed']}).", ""]
    extra = rep.get("train_composition") or {}
    if extra:
        lines += ["Train records by provenance: " + ", ".join(f"{k} {v}" for k, v in extra.items()), ""]
    lines += ["## Inputs", "", "| file | kind | encoding | schema | rows | valid |", "|---|---|---|---|---|---|"]
    for i in rep["files"]:
        lines.append(f"| {i['file']} | {i['kind']} | {i['encoding']} | {i.get('schema')} | {i['rows']} | {i.get('valid', 0)} |")
    lines += ["", "## Dropped by reason", "", "Every dropped record is listed with its file and line in `rejected.jsonl` "
              "(or, for duplicates, with its partner in `duplicates.jsonl`).", "", "| reason | records |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in dropped.items()] or ["| — | 0 |"]
    nd = rep.get("near_dedup") or {}
    if nd:
        lines += ["", "## Near-duplicates (MinHash + LSH)", "",
                  f"threshold {nd.get('threshold')}, {nd.get('ngram')}-gram shingles, {nd.get('num_perm')} permutations = "
                  f"{nd.get('bands')} bands × {nd.get('rows')} rows, verify {nd.get('verify')}: "
                  f"{nd.get('candidate_pairs', 0)} candidate pairs → {nd.get('pairs', 0)} confirmed → {nd.get('removed', 0)} removed."]
        for ex in rep.get("near_dup_examples", []):
            lines += [f"- `{ex['id']}` ≈ `{ex['duplicate_of_id']}` (Jaccard {ex['jaccard']}): {ex['text'][:60]!r} ≈ {ex['partner_text'][:60]!r}"]
    if rep.get("pii"):
        lines += ["", "## PII", "", "Masked: " + ", ".join(f"{k} {v}" for k, v in rep["pii"].items())]
    lab = rep["labels"]
    if any(k != "None" for k in lab["before"]):
        lines += ["", f"## Labels (`{rep['label_field']}`): skew before → after", "",
                  f"Largest/smallest class: before {_skew(lab['before'])}, after cleaning {_skew(lab['after'])}, "
                  f"train {_skew(lab['train'])} (after balancing/augmentation; test and eval keep the cleaned skew).", "",
                  "| label | before | after cleaning | train | test | eval |", "|---|---|---|---|---|---|"]
        for k in sorted(lab["before"], key=lambda x: -lab["before"][x]):
            lines.append(f"| {k} | {lab['before'][k]} | {lab['after'].get(k, 0)} | {lab['train'].get(k, 0)} | "
                         f"{lab['test'].get(k, 0)} | {lab['eval'].get(k, 0)} |")
    if rep.get("balance"):
        b = rep["balance"]
        lines += ["", f"Balancing ({b['method']}): {b['undersampled']} undersampled away, {b['oversampled']} oversampled copies."]
    lines += ["", "## Lengths", "", "| field | unit | count | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for unit, d in (("chars", rep.get("lengths_chars", {})), ("tokens", rep.get("lengths_tokens", {}))):
        for k, s in d.items():
            if s.get("count"):
                lines.append(f"| {k} | {unit} | {s['count']} | {s['mean']} | {s['p50']:.0f} | {s['p90']:.0f} | {s['p99']:.0f} | {s['max']} |")
    if rep.get("tokenizer"):
        lines += ["", f"Tokens counted with `{rep['tokenizer']}`."]
    plots = rep.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        for name, p in plots.items():
            lines.append(f"![{name}]({p})")
        if rep.get("plot_label_legend"):
            lines += ["", "No CJK font was found for the plots; label indices: " +
                      ", ".join(f"{k} = {v}" for k, v in rep["plot_label_legend"].items())]
    lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in rep["timings_s"].items()], ""]
    return "\n".join(lines)


def _skew(d: dict[str, int]) -> str:
    vals = [v for k, v in d.items() if k != "None" and v]
    return f"{max(vals) / min(vals):.1f}×" if vals else "—"
