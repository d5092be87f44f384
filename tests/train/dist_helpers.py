"""Helpers for the multi-process training tests: `dsft train CFG --nproc 2` in a real subprocess, and the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def train_two(cfg_path: Path, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    """`dsft train CFG --nproc 2 [extra]` in a real subprocess (accelerate launch, gloo); asserts it succeeded."""
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-m", "dsft", "train", str(cfg_path), "--nproc", "2", *extra], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def log_records(stage: Path) -> list[dict]:
    return [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines()]


def losses(stage: Path) -> dict[int, float]:
    """{step: loss} of the optimizer steps in a train stage's log.jsonl."""
    return {r["step"]: r["loss"] for r in log_records(stage) if "loss" in r and "event" not in r}


def objective_metric(stage: Path, key: str) -> dict[int, float]:
    """{step: value} of one objective metric (dpo/margin, grpo/reward …) in log.jsonl."""
    return {r["step"]: r["objective"][key] for r in log_records(stage)
            if "event" not in r and key in (r.get("objective") or {})}


STRATEGIES = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
              "zero2": {"strategy": "deepspeed", "zero_stage": 2}, "zero3": {"strategy": "deepspeed", "zero_stage": 3}}
"""train: keys of each multi-process strategy the tests run on CPU (gloo)."""
