"""`dsft train` on the command line: help, one-line errors with exit 2, the setup printout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from train_helpers import make_run, tiny_cfg

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "dsft", *args], env=env, capture_output=True, text=True, timeout=300)


def test_help_shows_resume_and_nproc():
    out = _dsft("train", "--help")
    assert out.returncode == 0 and "--resume" in out.stdout and "--nproc" in out.stdout and "examples:" in out.stdout


def test_missing_data_stage_is_one_line_exit_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}), encoding="utf-8")
    out = _dsft("train", str(p))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "dsft data" in out.stderr and "Traceback" not in out.stderr


def test_cli_trains_and_prints_adapted_modules(tmp_path, records16):
    make_run(tmp_path, records16)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_cfg(tmp_path, max_steps=2).model_dump(mode="json")), encoding="utf-8")
    out = _dsft("train", str(p))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "adapters on layers.{0-3}.self_attn.q_a_proj" in out.stdout
    assert "layers.{0}.mlp.gate_proj" in out.stdout and "layers.{1-3}.mlp.shared_experts.up_proj" in out.stdout
    assert "layers.{1-3}.mlp.experts" in out.stdout and "trainable" in out.stdout
    again = _dsft("train", str(p))
    assert again.returncode == 2 and "--force" in again.stderr
