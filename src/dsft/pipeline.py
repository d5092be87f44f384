"""`dsft run` / `dsft demo`: the stages in order, each reading the previous manifest, plus the run report."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import OverwriteError
from dsft.run import RunDir, atomic_write_json, atomic_write_text

PIPELINE = ("plan", "data", "train", "eval", "export", "serve")


def _stage_fn(stage: str) -> Callable[..., dict]:
    if stage == "plan":
        return plan_stage
    if stage == "data":
        from dsft.data import prepare

        return prepare
    if stage == "train":
        from dsft.train import train

        return train
    if stage == "eval":
        from dsft.eval.stage import run as run_eval

        return run_eval
    if stage == "export":
        from dsft.export.stage import run as run_export

        return run_export
    if stage == "serve":
        return serve_check
    raise ValueError(stage)


def plan_stage(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Size memory before training: the planner's table for this config on this device (plan/plan.{txt,json})."""
    from dsft.model.load import resolve_model_dir
    from dsft.plan import plan_for_config

    run.prepare_stage("plan", force=force)
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    plan = plan_for_config(cfg, model_dir)
    d = plan.to_dict()
    out = run.stage_dir("plan")
    atomic_write_text(out / "plan.txt", plan.table() + "\n")
    atomic_write_json(out / "plan.json", d)
    print(plan.table())
    manifest = {"plan_json": "plan.json", "plan_txt": "plan.txt", "fits": d["fits"], "verdict": d["verdict"],
                "peak_bytes": d["memory_bytes"]["peak"], "max_micro_batch": d["max_micro_batch"],
                "device": d["setup"]["gpu"]}
    run.write_manifest("plan", manifest)
    return manifest


def serve_check(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Start the real server on loopback for the exported model, send one /generate request, stop it."""
    import httpx

    from dsft.serve import serve_in_background

    export_m = run.read_manifest("export")
    model_dir = run.root / "export" / export_m["merged"]
    t0 = time.perf_counter()
    prompt = "头痛、发烧三天，应该怎么办？"
    with serve_in_background(str(model_dir), cfg.serve) as base_url:
        started = time.perf_counter() - t0
        r = httpx.post(f"{base_url}/generate", json={"prompt": prompt, "max_tokens": 32, "temperature": 0.7}, timeout=120)
        bad = httpx.post(f"{base_url}/generate", json={"prompt": 42}, timeout=60)
        chat = httpx.post(f"{base_url}/v1/chat/completions", timeout=120,
                          json={"model": httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"],
                                "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0})
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    chat_body = chat.json() if chat.status_code == 200 else {}
    chat_text = ((chat_body.get("choices") or [{}])[0].get("message") or {}).get("content")
    out = {
        "ok": r.status_code == 200 and isinstance(body.get("text"), str) and 400 <= bad.status_code < 500
        and isinstance(chat_text, str),
        "openai_chat_status": chat.status_code,
        "openai_chat_text": chat_text,
        "status": r.status_code,
        "bad_request_status": bad.status_code,
        "prompt": prompt,
        "text": body.get("text"),
        "startup_s": round(started, 2),
        "model_dir": str(model_dir),
    }
    run.stage_dir("serve")
    run.write_manifest("serve", out)
    return out


def run_pipeline(cfg: Config, run: RunDir, *, stages: tuple[str, ...] = PIPELINE, force: bool = False,
                 on_stage: Callable[[str, dict, float], None] | None = None) -> dict[str, Any]:
    """Run stages in order; return {stage: manifest} and {timings}. Each stage writes its own manifest."""
    from dsft.config.resolve import resolve_and_record
    from dsft.model.info import read_model_info

    cfg = resolve_and_record(cfg, run.root, read_model_info(cfg.model.name_or_path))  # no-op when already resolved
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    # Decide about overwriting before any work: without --force a finished stage stops the run now; with --force
    # every stage to be run is cleared first, so no stage can read a previous run's output of a later one.
    for stage in stages:
        if run.has(stage):
            if not force:
                raise OverwriteError(f"{run.root / stage} already holds a finished '{stage}' stage; pass --force to overwrite it")
            shutil.rmtree(run.root / stage)
    for stage in stages:
        t0 = time.perf_counter()
        manifest = _stage_fn(stage)(cfg, run, force=force)
        timings[stage] = round(time.perf_counter() - t0, 2)
        results[stage] = manifest
        if stage == "export" and (cfg.eval.variants or cfg.export.report) and "eval" in results:
            # the eval stage measures the variants: the quantization report and, for eval.variants, the same
            # held-out records (the seed's "latency −Z %" headline)
            from dsft.eval.stage import run_variants

            t1 = time.perf_counter()
            results["eval"] = run_variants(cfg, run, every=False)
            timings["eval"] = round(timings.get("eval", 0) + time.perf_counter() - t1, 2)
        if on_stage:
            on_stage(stage, manifest, timings[stage])
    results["timings"] = timings
    return results


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
