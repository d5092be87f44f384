"""`dsft run` / `dsft demo`: the six stages' `run(cfg, run_dir)` in order, each reading the previous manifest."""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from typing import Any

from dsft.config import Config
from dsft.errors import OverwriteError
from dsft.report.run_report import PIPELINE
from dsft.run import RunDir


def _stage_run(stage: str) -> Callable[..., dict]:
    """`dsft.<stage>.stage.run`, imported when the stage starts (keeps `dsft --help` free of torch)."""
    if stage not in PIPELINE:
        raise ValueError(stage)
    return importlib.import_module(f"dsft.{stage}.stage").run


def _clear_finished(run: RunDir, stages: tuple[str, ...], force: bool) -> None:
    """Without --force a finished stage stops the run before any work; with it every stage to run is cleared first,
    so no stage can read a previous run's output of a later one."""
    for stage in stages:
        if run.has(stage):
            if not force:
                raise OverwriteError(f"{run.root / stage} already holds a finished '{stage}' stage; pass --force to overwrite it")
            shutil.rmtree(run.root / stage)


def run_pipeline(cfg: Config, run: RunDir, *, stages: tuple[str, ...] = PIPELINE, force: bool = False,
                 on_stage: Callable[[str, dict, float], None] | None = None) -> dict[str, Any]:
    """Resolve the config once (resolved_config.yaml), then run the stages in order; return {stage: manifest} and
    {timings}. After export, the eval stage measures the exported variants (the quantization report)."""
    from dsft.config.resolve import resolve_and_record
    from dsft.model.info import read_model_info

    cfg = resolve_and_record(cfg, run.root, read_model_info(cfg.model.name_or_path))  # no-op when already resolved
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    _clear_finished(run, stages, force)
    for stage in stages:
        t0 = time.perf_counter()
        manifest = _stage_run(stage)(cfg, run, force=force)
        timings[stage] = round(time.perf_counter() - t0, 2)
        results[stage] = manifest
        if stage == "export" and (cfg.eval.variants or cfg.export.report) and "eval" in results:
            from dsft.eval.stage import run_variants

            t1 = time.perf_counter()
            results["eval"] = run_variants(cfg, run, every=False)
            timings["eval"] = round(timings.get("eval", 0) + time.perf_counter() - t1, 2)
        if on_stage:
            on_stage(stage, manifest, timings[stage])
    results["timings"] = timings
    return results
