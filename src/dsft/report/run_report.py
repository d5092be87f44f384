"""The run report (report.json + report.md): what each stage of `dsft run` / `dsft demo` did, in a few numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.run import atomic_write_json, atomic_write_text

PIPELINE = ("plan", "data", "train", "eval", "export", "serve")


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def build_report(cfg: Config, results: dict[str, Any]) -> dict[str, Any]:
    """The run report (report.json): what each stage did, in a few numbers."""
    pl, data, train, ev, exp, srv = (results.get(s, {}) for s in PIPELINE)
    counts = data.get("counts", {})
    before, after = ev.get("before", {}), ev.get("after", {})
    timings = dict(results.get("timings", {}))
    timings["total"] = round(sum(timings.values()), 2)
    return {
        "config": {"model": cfg.model.name_or_path, "data": cfg.data.path, "method": cfg.train.method},
        "plan": {"fits": pl.get("fits"), "verdict": pl.get("verdict"), "peak_bytes": pl.get("peak_bytes"),
                 "max_micro_batch": pl.get("max_micro_batch")},
        "data": {"input": counts.get("input"), "kept": counts.get("kept"), "dropped": counts.get("dropped", {}),
                 "train": counts.get("train"), "test": counts.get("test"), "derived": counts.get("derived")},
        "train": {"loss_first": train.get("loss_first"), "loss_last": train.get("loss_last"), "steps": train.get("steps"),
                  "tokens_per_s": train.get("tokens_per_s"), "trainable_params": train.get("trainable_params")},
        "eval": {"before": before, "after": after, "headline": ev.get("headline"),
                 "report_html": f"eval/{ev['report_html']}" if ev.get("report_html") else None},
        "export": {"max_abs_diff": exp.get("max_abs_diff"), "dtype": exp.get("dtype"), "variants": exp.get("variants"),
                   "quant_report": ev.get("quant_report")},
        "serve": {"ok": srv.get("ok"), "status": srv.get("status"), "text": srv.get("text"),
                  "bad_request_status": srv.get("bad_request_status"), "openai_chat_status": srv.get("openai_chat_status")},
        "timings": timings,
    }


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, int | float) else "—"


def _num(x: Any, fmt: str = "{:.4f}") -> str:
    return fmt.format(x) if isinstance(x, int | float) else "—"


def render_report_md(rep: dict[str, Any]) -> str:
    """report.md: the run in a page, with the seed's headline form."""
    b, a = rep["eval"]["before"], rep["eval"]["after"]
    lines = [
        "# dsft run report",
        "",
        f"Model `{rep['config']['model']}`, data `{rep['config']['data']}`, method `{rep['config']['method']}`.",
        "",
        f"**Department accuracy {_pct(b.get('accuracy'))} → {_pct(a.get('accuracy'))}; "
        f"ROUGE-L {_num(b.get('rouge_l'))} → {_num(a.get('rouge_l'))}** (held-out test split, base → fine-tuned).",
        "",
        *([f"Headline (seed form): **{rep['eval']['headline']}**.", ""] if rep["eval"].get("headline") else []),
        *([f"Full evaluation report: [{rep['eval']['report_html']}]({rep['eval']['report_html']})", ""]
          if rep["eval"].get("report_html") else []),
        "## Plan",
        f"- {rep.get('plan', {}).get('verdict') or '—'} (see plan/plan.txt)",
        "",
        "## Data",
        f"- input {rep['data']['input']} = kept {rep['data']['kept']} + dropped {json.dumps(rep['data']['dropped'], ensure_ascii=False)}",
        f"- train {rep['data']['train']} (+{rep['data']['derived']} derived classification records), test {rep['data']['test']}",
        "- per-step counts, length and label histograms: [data/data_report.md](data/data_report.md); removed records and "
        "their reasons: data/rejected.jsonl, data/duplicates.jsonl",
        "",
        "## Train",
        f"- loss {_num(rep['train']['loss_first'])} → {_num(rep['train']['loss_last'])} in {rep['train']['steps']} steps, "
        f"{_num(rep['train']['tokens_per_s'], '{:.0f}')} tokens/s, {rep['train']['trainable_params']} trainable parameters",
        "",
        "## Eval (before → after)",
        "| metric | base | fine-tuned |",
        "|---|---|---|",
    ]
    for k in sorted(set(b) | set(a)):
        if isinstance(b.get(k), int | float) or isinstance(a.get(k), int | float):
            lines.append(f"| {k} | {_num(b.get(k))} | {_num(a.get(k))} |")
    lines += [
        "",
        "## Export",
        f"- merged ({rep['export']['dtype']}), max |merged − adapter| logits = {_num(rep['export']['max_abs_diff'], '{:.2e}')}",
        *[f"- variant `{v.get('name')}`: {v.get('format')} {v.get('dtype', '')}, {_num(v.get('size_bytes'), '{:,.0f}')} bytes"
          for v in (rep["export"].get("variants") or [])],
        "",
        *_quant_table(rep["export"].get("quant_report")),
        "## Serve",
        f"- POST /generate → HTTP {rep['serve']['status']}, ok = {rep['serve']['ok']}: {rep['serve']['text']!r}",
        f"- POST /v1/chat/completions (OpenAI API) → HTTP {rep['serve'].get('openai_chat_status')}",
        "",
        "## Timings (s)",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rep["timings"].items()],
        "",
    ]
    return "\n".join(lines)


def _quant_table(qr: Any) -> list[str]:
    """The export stage's quantization report rows as a Markdown table (measured in the same run)."""
    rows = qr.get("rows") if isinstance(qr, dict) else None
    if not rows:
        return []
    out = ["", "### Quantization report (held-out split, this machine)",
           "| variant | size | perplexity (Δ %) | accuracy | ROUGE-L | prefill tok/s | decode tok/s | engine |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.get('variant')} | {_num(r.get('size_ratio'), '{:.2f}')}× | {_num(r.get('perplexity'), '{:.1f}')} "
                   f"({_num(r.get('perplexity_delta_pct'), '{:+.2f}')}) | {_pct(r.get('accuracy'))} | {_num(r.get('rouge_l'))} "
                   f"| {_num(r.get('prefill_tok_s'), '{:.0f}')} | {_num(r.get('decode_tok_s'), '{:.0f}')} | {r.get('engine')} |")
    return out + [""]


def write_report(run_root: Path, rep: dict[str, Any]) -> tuple[Path, Path]:
    jp, mp = Path(run_root) / "report.json", Path(run_root) / "report.md"
    atomic_write_json(jp, rep)
    atomic_write_text(mp, render_report_md(rep))
    return jp, mp
