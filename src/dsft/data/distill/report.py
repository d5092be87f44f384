"""distill_report.{json,html} and distill.png: input, sampling (tokens, cost, retries, budget), verification
(kept + Σ dropped by reason), lengths of the kept traces and the mix."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dsft.report.markup import html_page, html_table, img_figure, one_line
from dsft.report.numbers import fmt_count, fmt_pct
from dsft.report.plots import pyplot, save_png
from dsft.run import atomic_write_json, atomic_write_text

CSS = "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;padding:2px 6px}" \
      "table{border-collapse:collapse;margin:0.5em 0}.bad{color:#b00}"


def length_stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "mean": round(statistics.fmean(v), 1), "p50": v[len(v) // 2],
            "p90": v[min(len(v) - 1, int(0.9 * len(v)))], "max": v[-1]}


def plot(rep: dict[str, Any], kept: list[dict[str, Any]], path: Path) -> Path:
    """Three panels: samples kept / dropped by reason, reasoning length of the kept traces, the mix."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    v = rep["verify"]
    bars = {"kept": v["kept"], **dict(sorted(v["dropped"].items(), key=lambda kv: -kv[1]))}
    axes[0].barh(list(bars)[::-1], list(bars.values())[::-1], color=["#C44E52"] * (len(bars) - 1) + ["#55A868"])
    axes[0].set_title(f"{v['samples']} samples: kept / dropped", fontsize=10)
    axes[1].hist([len(r["reasoning"] or "") for r in kept] or [0], bins=30, color="#4C72B0")
    axes[1].set_title("reasoning length of kept traces (chars)", fontsize=10)
    m = rep["mix"]
    axes[2].bar(["reasoning", "non-reasoning"], [m["reasoning"], m["non_reasoning"]], color=["#4C72B0", "#DD8452"])
    share = m["share_actual"]
    axes[2].set_title(f"mix: reasoning share {share if share is not None else '—'} (target {m['share_target']})",
                      fontsize=10)
    return save_png(fig, path, dpi=80)


def _kv(d: dict[str, Any]) -> list[list[Any]]:
    return [[k, one_line(v, 160)] for k, v in d.items() if not isinstance(v, dict | list) or not v]


def render_html(rep: dict[str, Any], png: Path | None) -> str:
    s, v, m = rep["sampling"], rep["verify"], rep["mix"]
    ok = "" if v["accounting_ok"] else " class='bad'"
    body = [f"<h1>Distillation report — {one_line(s['teacher']['model'])}</h1>",
            f"<p>{fmt_count(rep['input']['prompts'])} prompts; {s['done']} sampled ({fmt_pct(s['done'] / max(1, rep['input']['prompts']))}), "
            f"{s['pending']} pending{' — ' + one_line(s['stopped']) if s.get('stopped') else ''}.</p>"]
    if png:
        body.append(img_figure(png, "kept/dropped samples, reasoning lengths, mix"))
    body += ["<h2>Input</h2>", html_table(["", "value"], _kv(rep["input"])),
             "<h2>Sampling</h2>", html_table(["", "value"], _kv({k: s[k] for k in s if k != "session"})),
             html_table(["budget", "value"], _kv(s["budget"]))]
    if s.get("session"):
        body.append(html_table(["this run", "value"], _kv(s["session"]) + [["retry causes", s["session"]["retry_causes"]]]))
    body += ["<h2>Verification</h2>",
             f"<p{ok}>{v['samples']} samples = {v['kept']} kept + {v['samples'] - v['kept']} dropped "
             f"({'adds up' if v['accounting_ok'] else 'DOES NOT ADD UP'}); correctness: {one_line(v['correctness'])}; "
             f"{v['prompts_with_kept']} prompts have a kept trace.</p>",
             html_table(["reason", "samples"], sorted(v["dropped"].items(), key=lambda kv: -kv[1])),
             html_table(["length (chars)", "n", "mean", "p50", "p90", "max"],
                        [[k, *(x.get(c, "") for c in ("n", "mean", "p50", "p90", "max"))] for k, x in rep["lengths"].items()]),
             "<h2>Mix</h2>", html_table(["", "value"], _kv(m) + [["repeated", m["repeated"]],
                                                                ["non-reasoning skipped", m["non_reasoning_skipped"]]]),
             "<h2>Files</h2>", html_table(["file", "path"], list(rep["files"].items()))]
    return html_page("dsft distill report", body, CSS)


def write_report(out: Path, rep: dict[str, Any], kept: list[dict[str, Any]]) -> dict[str, str]:
    """Write the JSON, the PNG (unless plots fail: the report must not) and the HTML page; returns their names."""
    rep["lengths"] = {"reasoning": length_stats([len(r["reasoning"] or "") for r in kept]),
                      "answer": length_stats([len(r["fields"]["answer"]) for r in kept])}
    atomic_write_json(out / "distill_report.json", rep)
    try:
        png = plot(rep, kept, out / "distill.png")
    except Exception as err:  # a report without its picture beats no report
        rep["plot_error"] = f"{type(err).__name__}: {err}"
        png = None
    atomic_write_text(out / "distill_report.html", render_html(rep, png))
    return {"report_json": "distill_report.json", "report_html": "distill_report.html",
            **({"report_png": "distill.png"} if png else {})}
