"""The train stage, top to bottom: data manifest → setup → (resume) → loop → adapter/model + manifest.

Reads `<run_dir>/data/manifest.json` and writes `<run_dir>/train/` (see docs/train.md). Heavy imports (torch,
transformers) happen inside `run`, so importing the stage stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import DataError, OverwriteError
from dsft.run import RunDir, read_jsonl

log = logging.getLogger("dsft.train")


def run(cfg: Config, run_dir: RunDir, *, force: bool = False, resume: str | None = None, resume_force: bool = False,
        eval_fn=None, fault_hook=None, progress: bool | None = None) -> dict[str, Any]:
    """Train on the data stage's train.jsonl; write adapter/ (or model/) and the train manifest, and return it.

    resume: "auto" (newest intact checkpoint) or a checkpoint folder; resume_force: accept a changed dataset,
    effective batch or method. eval_fn(model, step) → metrics replaces the built-in eval loss; fault_hook(step,
    micro_batch) runs before every micro-batch (tests); progress: the bar on (True) / off (False) / on a TTY (None).
    """
    from dsft.train import loop, outputs, state
    from dsft.train.console import print_setup
    from dsft.train.dist import Dist
    from dsft.train.monitor import Monitor
    from dsft.train.recipe import build_recipe, build_state

    if cfg.resolution is None:  # called directly (tests, scripts): resolve the defaults once, as the CLI does
        from dsft.config.resolve import resolve_config
        from dsft.model.info import read_model_info

        cfg = resolve_config(cfg, read_model_info(cfg.model.name_or_path))
    records, eval_records, train_path = read_splits(run_dir)
    dist = Dist(cfg.train)
    if dist.is_main:
        claim_stage_dir(run_dir, resume=resume, force=force)
    dist.barrier()
    r, model = build_recipe(cfg, run_dir, dist, records, eval_records, train_path)
    eval_fn = eval_fn or default_eval_fn(cfg, eval_records, r.tok)
    s = build_state(r, model, eval_fn)
    if resume and (path := state.find_checkpoint(resume, r.stage_dir / "checkpoints")) is not None:
        state.restore(s, path, r.run_info(), resume_force=resume_force)
    elif resume:
        log.info("dsft train: --resume auto: no checkpoint in %s, starting from step 0", r.stage_dir / "checkpoints")
    # DeepSpeed: one deepspeed.initialize for the loss module and AdamW, after a resumed checkpoint went into both
    s.loss_mod, s.opt = dist.prepare_optimizer(s.loss_mod, s.opt, tc=cfg.train, micro=s.ladder.micro_batch,
                                               accum=max(1, r.effective // (s.ladder.micro_batch * dist.world)))
    s.monitor = Monitor(r.stage_dir, cfg.train, start_step=s.step, history=s.history, is_main=dist.is_main)
    loop.with_offload(s, s.step)
    s.monitor.log_params(tracked_params(r))
    if dist.is_main:
        print_setup(r)

    try:
        result = loop.train_loop(r, s, eval_fn=eval_fn, fault_hook=fault_hook, progress=progress)
    finally:  # GRPO's vLLM rollout engine holds memory (weights, KV cache) until it is stopped
        if hasattr(r.objective, "close"):
            r.objective.close()

    adapter, model_dir = outputs.save_trained(r, s)
    s.monitor.plot(r.stage_dir / "loss.png")
    if r.objective is not None and dist.is_main:
        r.objective.plot(s.monitor.history, r.stage_dir)
    s.monitor.close(png=r.stage_dir / "loss.png")
    manifest = outputs.manifest(r, s, result, adapter, model_dir)
    if dist.is_main:
        run_dir.write_manifest("train", manifest)
    dist.barrier()
    dist.end()
    return manifest


def read_splits(run: RunDir) -> tuple[list[dict], list[dict], Path]:
    """(train records, eval records, train.jsonl path) named by the data stage's manifest."""
    data_m = run.read_manifest("data")
    records, train_path = _read_split(run, data_m, "train")
    if train_path is None:
        raise DataError(f"{run.manifest_path('data')}: key 'train': expected the path of train.jsonl")
    eval_records, _ = _read_split(run, data_m, "eval")
    return records, eval_records, train_path


def _read_split(run: RunDir, manifest: dict, key: str) -> tuple[list[dict], Path | None]:
    rel = manifest.get(key)
    if not rel:
        return [], None
    p = Path(rel)
    if not p.is_absolute():
        p = run.root / "data" / p
    if not p.exists():
        raise DataError(f"{p}: the data manifest names this '{key}' file but it does not exist")
    return read_jsonl(p), p


def claim_stage_dir(run: RunDir, *, resume: str | None, force: bool) -> Path:
    """<run_dir>/train/, refusing to overwrite a finished run or an interrupted one's checkpoints by accident."""
    d = run.root / "train"
    if resume is None:
        if (d / "manifest.json").exists() or not (d / "checkpoints").exists() or force:
            return run.prepare_stage("train", force=force)
        raise OverwriteError(f"{d} holds checkpoints of an interrupted run: pass --resume auto to continue it, "
                             f"or --force to start over")
    if (d / "manifest.json").exists():
        raise OverwriteError(f"{d} already holds a finished training run; nothing to resume (--force starts over)")
    d.mkdir(parents=True, exist_ok=True)
    return d


def default_eval_fn(cfg: Config, eval_records: list[dict], tok):
    """The eval stage's during-training metric when one other than the eval loss is configured, else None."""
    if cfg.train.evaluation_strategy == "no" or not eval_records or cfg.train.objective != "sft" or \
            cfg.eval.during_training_metric in ("eval_loss", "loss"):
        return None
    from dsft.eval.during_training import make_eval_fn  # the eval stage's public during-training hook

    return make_eval_fn(cfg, eval_records, tok)


def tracked_params(r) -> dict[str, Any]:
    """The resolved training config as MLflow params / W&B config."""
    tc, hp, info = r.tc, r.hp, r.info
    return {"method": tc.method, "learning_rate": hp.learning_rate, "lora_r": info.get("r"),
            "lora_alpha": info.get("alpha"), "micro_batch": r.micro, "effective_batch": r.effective,
            "epochs": hp.epochs, "max_steps": r.total_steps, "lr_scheduler": tc.lr_scheduler,
            "warmup_ratio": tc.warmup_ratio, "max_seq_length": r.cfg.data.max_seq_length, "preset": hp.preset,
            "base_model": r.model_dir.name, "precision": r.precision, "packing": tc.packing,
            "examples": len(r.examples), "world_size": r.dist.world}
