"""Issue 14's acceptance: `dsft train examples/seed_config.yaml` (short run on the embedded model) evaluates during
training, logs eval loss, stops early when patience runs out; `evaluation_strategy: epoch` evaluates per epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed_config.yaml"
SHORT = ["--set", "model.name_or_path=embedded:tiny-deepseek-v3", "--set", "data.path=embedded:medical",
         "--set", "data.max_samples=120", "--set", "data.max_seq_length=192", "--set", "train.precision=fp32"]


def _dsft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_seed_config_evaluates_during_training_and_stops_early(tmp_path):
    run = tmp_path / "run"
    prep = _dsft("data", "prepare", str(SEED), "--run-dir", str(run), *SHORT, cwd=tmp_path)
    assert "eval split 5% carved for evaluation_strategy steps" in prep.stdout
    report = json.loads((run / "data" / "data_report.json").read_text(encoding="utf-8"))
    assert report["counts"]["eval"] > 0  # the carved split, stated in the data report

    r = _dsft("train", str(SEED), "--run-dir", str(run), *SHORT, "--set", "train.max_steps=40",
              "--set", "train.eval_steps=2", cwd=tmp_path)
    log = _log(run)
    evals = [e for e in log if e.get("event") == "eval"]
    stops = [e for e in log if e.get("event") == "early_stop"]
    assert [e["step"] for e in evals][:2] == [2, 4] and all("eval_loss" in e for e in evals)
    assert len(stops) == 1 and stops[0]["patience"] == 3  # the guide's patience from training_args
    steps = json.loads((run / "train" / "manifest.json").read_text(encoding="utf-8"))["steps"]
    assert steps == stops[0]["step"] < 40 and "early_stop" in r.stdout + r.stderr
    resolved = (run / "resolved_config.yaml").read_text(encoding="utf-8")
    assert "early_stopping_delta: 0.001" in resolved and "eval_size: 0.05" in resolved
    assert (tmp_path / "logs").is_dir()  # training_args.logging_dir is where TensorBoard writes

    _dsft("train", str(SEED), "--run-dir", str(run), *SHORT, "--set", "train.evaluation_strategy=epoch",
          "--set", "train.eval_steps=100", "--set", "train.num_train_epochs=2", "--force", cwd=tmp_path)
    log = _log(run)
    epoch_at = {e["step"]: e["epoch"] for e in log if "loss" in e and "event" not in e}
    eval_steps = [e["step"] for e in log if e.get("event") == "eval"]
    assert len(eval_steps) == 2 and [epoch_at[s] for s in eval_steps] == [1.0, 2.0]
