"""report.md and a self-contained report.html (PNGs inlined as base64) for the eval stage."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from dsft.report.markup import html_page, img_figure, md_table, one_line
from dsft.report.numbers import fmt_metric
from dsft.run import atomic_write_text

ROWS = (("loss", "loss", "lower"), ("perplexity", "perplexity", "lower"), ("rouge_1", "ROUGE-1", "higher"),
        ("rouge_2", "ROUGE-2", "higher"), ("rouge_l", "ROUGE-L", "higher"), ("bleu", "BLEU", "higher"),
        ("f1", "F1 (SQuAD/CMRC)", "higher"), ("em", "EM", "higher"), ("accuracy", "accuracy", "higher"),
        ("macro_f1", "Macro-F1", "higher"), ("auc", "AUC (OvR)", "higher"),
        ("gen_accuracy", "accuracy, free-text answer", "higher"),
        ("latency_ms_per_sample", "latency ms/sample", "lower"), ("ms_per_new_token", "ms per generated token", "lower"))


def _delta(key: str, better: str, b: Any, a: Any) -> str:
    if not isinstance(b, int | float) or not isinstance(a, int | float):
        return ""
    d = a - b
    good = (d > 0) if better == "higher" else (d < 0)
    sign = "+" if d > 0 else ("−" if d < 0 else "±")
    return f"{sign}{abs(d):.4f}" + (" ✓" if good and d != 0 else "")


def _table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header (model names [+ Δ]) and rows; Δ = fine-tuned − base, ✓ when it moved the right way."""
    names = list(result["models"])
    with_delta = "base" in names and "finetuned" in names
    body = []
    for key, label, better in ROWS:
        vals = [result["models"][n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        row = [f"{label} ({better} is better)", *[fmt_metric(v) for v in vals]]
        if with_delta:
            row.append(_delta(key, better, result["models"]["base"].get(key), result["models"]["finetuned"].get(key)))
        body.append(row)
    return (names + ["Δ fine-tuned − base"]) if with_delta else names, body


def _breakdown_tables(result: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{field: (header, rows)} with ROUGE-L and accuracy of every model per group."""
    names = list(result["models"])
    fields: list[str] = []
    for m in result["models"].values():
        fields += [f for f in (m.get("breakdown") or {}) if f not in fields]
    out = {}
    for f in fields:
        groups: list[str] = []
        for n in names:
            groups += [g for g in (result["models"][n].get("breakdown") or {}).get(f, {}) if g not in groups]
        header = [f, "n", *[f"ROUGE-L {n}" for n in names], *[f"accuracy {n}" for n in names]]
        rows = []
        for g in groups:
            cells = [(result["models"][n].get("breakdown") or {}).get(f, {}).get(g, {}) for n in names]
            rows.append([g, str(next((c["n"] for c in cells if c), "")), *[fmt_metric(c.get("rouge_l")) for c in cells],
                         *[fmt_metric(c.get("accuracy")) for c in cells]])
        out[f] = (header, rows)
    return out


def _samples(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to k items with each model's generation side by side."""
    by_id: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []
    for r in rows:
        if r.get("task") != "generation":
            continue
        if r["id"] not in by_id:
            by_id[r["id"]] = {"id": r["id"], "prompt": r.get("prompt", ""), "reference": r.get("reference", ""), "outputs": {}}
            order.append(r["id"])
        by_id[r["id"]]["outputs"][r["model"]] = r.get("prediction", "")
    return [by_id[i] for i in order[:k]]


def render_md(result: dict[str, Any], rows: list[dict[str, Any]], pngs: dict[str, str], k: int) -> str:
    names, body = _table_rows(result)
    lines = ["# dsft eval report", "", f"**{result['headline']}** (held-out test split, {result['n']} records, lang `{result['lang']}`)", "",
             *md_table(["metric", *names], body)]
    lines += ["", "Metric definitions: " + "; ".join(f"{k}: {v}" for k, v in result.get("metric_notes", {}).items()), ""]
    lines += ["Decoding: " + ", ".join(f"{k}={v}" for k, v in result.get("decoding", {}).items()), ""]
    for field, (header, brows) in _breakdown_tables(result).items():
        lines += [f"## By {field}", "", *md_table(header, brows)]
        lines.append("")
    if result.get("contamination"):
        c = result["contamination"]
        lines += ["## Contamination check", "", f"{c['flagged']} of {c['checked']} eval items share ≥ {c['threshold']:.0%} of their "
                  f"{c['n']}-grams with a training item.", ""]
        lines += [f"- `{p['eval_id']}` ↔ `{p['train_id']}`: {p['overlap']:.2f}" for p in c.get("pairs", [])[:20]]
        lines.append("")
    for key, title in (("loss", "Loss curve"),):
        if key in pngs:
            lines += [f"## {title}", "", f"![{title}]({pngs[key]})", ""]
    for key in pngs:
        if key.startswith("confusion_"):
            lines += [f"## Confusion matrix ({key[len('confusion_'):]})", "", f"![{key}]({pngs[key]})", ""]
    samples = _samples(rows, k)
    if samples:
        lines += ["## Sample generations", ""]
        for s in samples:
            lines += [f"### {s['id']}", "", f"- **prompt**: {one_line(s['prompt'])}", f"- **reference**: {one_line(s['reference'])}"]
            lines += [f"- **{n}**: {one_line(t)}" for n, t in s["outputs"].items()]
            lines.append("")
    return "\n".join(lines)


_CSS = """body{font-family:'Noto Sans CJK SC','PingFang SC','Microsoft YaHei',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}.headline{font-size:1.4em;font-weight:bold;background:#eef6ee;padding:.5em 1em;border-radius:6px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.better{color:#1a7f37;font-weight:bold}
.samples td{text-align:left;vertical-align:top;max-width:320px;font-size:.9em}img{max-width:100%;border:1px solid #ddd}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.plots figure{margin:0;max-width:48%}"""


def render_html(result: dict[str, Any], rows: list[dict[str, Any]], pngs: dict[str, str], out_dir: Path, k: int) -> str:
    e = html.escape
    names, body = _table_rows(result)
    parts = ["<h1>dsft eval report</h1>", f"<p class='headline' id='headline'>{e(result['headline'])}</p>",
             f"<p>Held-out test split: {result['n']} records, language <code>{e(result['lang'])}</code>.</p>",
             "<h2>Before / after</h2><table id='metrics'><tr><th>metric</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    for r in body:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    parts.append("<p><small>" + "<br>".join(f"<b>{e(k)}</b>: {e(v)}" for k, v in result.get("metric_notes", {}).items()) + "</small></p>")
    parts.append("<p><small>Decoding: " + e(", ".join(f"{k}={v}" for k, v in result.get("decoding", {}).items())) + "</small></p>")
    figs = [img_figure(out_dir / p, key.replace("_", " ")) for key, p in pngs.items() if (out_dir / p).exists()]
    if figs:
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(figs) + "</div>")
    if result.get("labels"):
        parts.append("<p><small>Confusion-matrix classes (index = label): " + e(", ".join(
            f"{i} = {lab}" for i, lab in enumerate(result["labels"]))) + "</small></p>")
    for field, (header, brows) in _breakdown_tables(result).items():
        parts.append(f"<h2>By {e(field)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in brows]
        parts.append("</table>")
    if result.get("contamination"):
        c = result["contamination"]
        parts.append(f"<h2>Contamination check</h2><p>{c['flagged']} of {c['checked']} eval items share ≥ {c['threshold']:.0%} "
                     f"of their {c['n']}-grams with a training item.</p>")
        if c.get("pairs"):
            parts.append("<table><tr><th>eval item</th><th>train item</th><th>overlap</th></tr>" + "".join(
                f"<tr><td>{e(str(p['eval_id']))}</td><td>{e(str(p['train_id']))}</td><td>{p['overlap']:.2f}</td></tr>"
                for p in c["pairs"][:50]) + "</table>")
    samples = _samples(rows, k)
    if samples:
        models = list(samples[0]["outputs"])
        parts.append("<h2>Sample generations</h2><table class='samples' id='samples'><tr><th>prompt</th><th>reference</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in models) + "</tr>")
        for s in samples:
            parts.append("<tr>" + f"<td>{e(one_line(s['prompt']))}</td><td>{e(one_line(s['reference']))}</td>"
                         + "".join(f"<td>{e(one_line(s['outputs'].get(n, '')))}</td>" for n in models) + "</tr>")
        parts.append("</table>")
    return html_page("dsft eval report", parts, _CSS)


def write_reports(out_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]], pngs: dict[str, str], cfg) -> dict[str, str]:
    """Write report.md and report.html into out_dir; return their manifest entries."""
    k = cfg.eval.samples_in_report
    atomic_write_text(out_dir / "report.md", render_md(result, rows, pngs, k))
    atomic_write_text(out_dir / "report.html", render_html(result, rows, pngs, out_dir, k))
    return {"report_md": "report.md", "report_html": "report.html"}
