"""Stage 'data': read → validate → sample → quality filters → exact dedup → near dedup → decontaminate → split,
balance, augment, derive, write. One pipeline of steps; the driver holds the records in memory or streams them."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from dsft.config import Config
from dsft.data.context import StageContext
from dsft.data.store import JsonlWriter, Store, new_store
from dsft.errors import DataError
from dsft.run import RunDir, atomic_write_json, atomic_write_text, write_jsonl

log = logging.getLogger("dsft.data")


def run(cfg: Config, run_dir: RunDir, *, force: bool = False) -> dict[str, Any]:
    """Run the data stage into `<run_dir>/data/`; returns the manifest (see docs/ARCHITECTURE.md).
    `data.streaming: true` keeps the records in work files instead of memory; the outputs are the same bytes."""
    from dsft.data.engine import get_engine

    if cfg.train.objective != "sft":  # preference pairs or RL prompts: their own reader (docs/preference.md)
        from dsft.data import preference

        return preference.run(cfg, run_dir, force=force)
    d = cfg.data
    out_dir = run_dir.prepare_stage("data", force=force)
    if d.streaming and "shuffle_buffer" in d.model_fields_set:
        log.warning("data.shuffle_buffer does not change `dsft data prepare` (streaming splits like the in-memory "
                    "driver); it applies to `dsft data split --buffer`")
    work_dir = out_dir / ".work"
    ctx = StageContext(cfg, out_dir, get_engine(d.engine, d.workers), JsonlWriter(out_dir / "rejected.jsonl"),
                       streaming=d.streaming)
    try:
        store = clean(ctx, new_store(d.streaming, work_dir))
        if not len(store):
            _refuse_empty(ctx)
        from dsft.data.output import write_splits

        summary = write_splits(store, ctx)
        ctx.timer.step("split_write")
    except BaseException:
        ctx.rejected.discard()
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    ctx.rejected.close()
    write_jsonl(out_dir / "duplicates.jsonl", ctx.duplicates)
    return _finish(ctx, run_dir, summary)


def clean(ctx: StageContext, store: Store) -> Store:
    """Read every file into the store, then the cleaning steps in order; each drop is counted and listed."""
    from dsft.data import dedup, filters
    from dsft.data.load import read_all, require_records
    from dsft.data.progress import step_bar

    d = ctx.d

    def add(rec: dict) -> None:
        store.add(rec)
        ctx.labels_before[str(rec.get("label"))] += 1

    with step_bar("read") as bar:
        ctx.infos = read_all(d, add, ctx.reject, strict=d.strict, streaming=ctx.streaming, on_rows=bar.update)
        bar.refresh()
    store = store.finish()
    ctx.n_input = len(store) + sum(ctx.dropped.values())
    require_records(ctx.n_input, ctx.infos)
    ctx.timer.step("read")
    if d.max_samples and len(store) > d.max_samples:
        store = filters.sample_step(store, ctx)
        ctx.timer.step("max_samples")
    if d.quality.enabled:
        store = filters.quality_step(store, ctx)
        if d.quality.min_tokens or d.quality.max_tokens:
            store = filters.token_step(store, ctx)
        ctx.timer.step("quality")
    positions = list(range(len(store)))  # duplicates.jsonl indices: positions among the records entering dedup
    if d.dedup_exact:
        store, positions = dedup.exact_dedup_step(store, ctx)
        ctx.timer.step("dedup_exact")
    if d.near_dedup.enabled and len(store) > 1:
        store = dedup.near_dedup_step(store, ctx, positions)
        ctx.timer.step("dedup_near")
    if d.quality.enabled and d.quality.decontaminate:
        store = filters.decontaminate_step(store, ctx)
        ctx.timer.step("decontaminate")
    return store


def _refuse_empty(ctx: StageContext) -> None:
    """Nothing survived: write rejected.jsonl, duplicates.jsonl and the report (the accounting can be checked),
    then stop with one line pointing at them."""
    from dsft.data.report import build_report, render_md

    ctx.rejected.close()
    write_jsonl(ctx.out_dir / "duplicates.jsonl", ctx.duplicates)
    report = build_report(ctx, None)
    report["timings_s"] = ctx.timer.t
    atomic_write_json(ctx.out_dir / "data_report.json", report)
    atomic_write_text(ctx.out_dir / "data_report.md", render_md(report))
    files = ", ".join(i["file"] for i in ctx.infos)
    raise DataError(f"{files}: no record left after validation, filters and dedup (dropped: {dict(ctx.dropped)}); "
                    f"see {ctx.out_dir / 'rejected.jsonl'} and {ctx.out_dir / 'data_report.md'}")


def _finish(ctx: StageContext, run_dir: RunDir, summary) -> dict[str, Any]:
    """Check the accounting, write data_report.{json,md} and the manifest."""
    from dsft.data.report import build_report, lengths_and_plots, render_md

    report = build_report(ctx, summary)
    counts = report["counts"]
    if not report["accounting_holds"]:  # pragma: no cover - an invariant, never expected
        raise DataError(f"internal accounting error: input {counts['input']} ≠ kept {counts['kept']} + dropped {counts['dropped']}")
    chars = {k: v for k, v in summary.chars.items() if v}
    tokens = {k: v for k, v in summary.tokens.items() if v or k == "conversation"}
    lengths_and_plots(report, ctx.cfg, ctx.out_dir, chars, tokens, summary.token_error)
    ctx.timer.step("report")
    report["timings_s"] = ctx.timer.t
    atomic_write_json(ctx.out_dir / "data_report.json", report)
    atomic_write_text(ctx.out_dir / "data_report.md", render_md(report))
    manifest = {"train": "train.jsonl", "test": "test.jsonl", "eval": "eval.jsonl", "report": "data_report.json",
                "counts": counts, "labels": sorted(summary.final_labels), "label_field": ctx.d.label_field}
    run_dir.write_manifest("data", manifest)
    log.debug("data: %d in → %d kept (dropped %s); train %d (+%d derived), test %d, eval %d", counts["input"],
              counts["kept"], counts["dropped"], counts["train"], counts["derived"], counts["test"], counts["eval"])
    return manifest
