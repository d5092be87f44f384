"""Stage 'plan' of the pipeline: the planner's table for this config on this device → plan/plan.{txt,json}."""

from __future__ import annotations

from typing import Any

from dsft.config import Config
from dsft.run import RunDir, atomic_write_json, atomic_write_text


def run(cfg: Config, run_dir: RunDir, *, force: bool = False) -> dict[str, Any]:
    """Size memory before training; the manifest carries the verdict the run report shows."""
    from dsft.model.load import resolve_model_dir
    from dsft.plan.api import plan_for_config

    run_dir.prepare_stage("plan", force=force)
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    plan = plan_for_config(cfg, model_dir)
    d = plan.to_dict()
    out = run_dir.stage_dir("plan")
    text = plan.table()
    atomic_write_text(out / "plan.txt", text + "\n")
    atomic_write_json(out / "plan.json", d)
    print(text)
    manifest = {"plan_json": "plan.json", "plan_txt": "plan.txt", "fits": d["fits"], "verdict": d["verdict"],
                "peak_bytes": d["memory_bytes"]["peak"], "max_micro_batch": d["max_micro_batch"],
                "device": d["setup"]["gpu"]}
    run_dir.write_manifest("plan", manifest)
    return manifest
