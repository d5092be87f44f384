"""Resume robustness: kill -9 at an arbitrary step, torn checkpoints, keep-last-K, changed data/batch refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run, tiny_cfg

from dsft.errors import TrainError
from dsft.train import train
from dsft.train.checkpoint import latest_valid, list_checkpoints

KW = dict(max_steps=12, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)


def _losses(stage: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def _adapter(stage: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage / "adapter" / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-m", "dsft", "train", str(cfg_path), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write_cfg(root: Path, records) -> Path:
    make_run(root, records)
    cfg = tiny_cfg(root, **{**KW, "max_steps": 18}).model_dump(mode="json")  # ≥ 10 steps left after the kill
    p = root / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return p


def test_kill_minus_9_then_resume_auto_is_bit_exact(tmp_path, records16):
    ref = _cli(_write_cfg(tmp_path / "ref", records16))
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    cfg = _write_cfg(tmp_path / "k", records16)
    log = tmp_path / "k/train/log.jsonl"
    proc = _cli(cfg)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill at step 8 or later: mid-save of checkpoint-9 possibly
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "k/train/manifest.json").exists()
    res = _cli(cfg, "--resume", "auto")
    out, _ = res.communicate(timeout=300)
    assert res.returncode == 0, out
    assert _losses(tmp_path / "k/train") == _losses(tmp_path / "ref/train")
    assert _same(_adapter(tmp_path / "k/train"), _adapter(tmp_path / "ref/train"))
    m = json.loads((tmp_path / "k/train/manifest.json").read_text())
    assert m["steps"] == 18


def test_torn_checkpoint_is_skipped_and_last_k_kept(tmp_path, records16):
    ref_run = make_run(tmp_path / "ref", records16)
    train(tiny_cfg(tmp_path / "ref", **KW, save_total_limit=2), ref_run)
    assert [s for s, _ in list_checkpoints(tmp_path / "ref/train/checkpoints")] == [9, 12]

    run = make_run(tmp_path / "t", records16)
    cfg = tiny_cfg(tmp_path / "t", **KW, save_total_limit=2)
    with pytest.raises(Crash):
        train(cfg, run, fault_hook=crash_at(8))
    root = tmp_path / "t/train/checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [3, 6]
    with open(root / "checkpoint-6" / "trainable.safetensors", "r+b") as fh:  # a crash mid-write
        fh.truncate(100)
    assert latest_valid(root).name == "checkpoint-3"
    m = train(cfg, run, resume="auto")
    assert m["steps"] == 12
    assert _losses(tmp_path / "t/train") == _losses(tmp_path / "ref/train")
    assert _same(_adapter(tmp_path / "t/train"), _adapter(tmp_path / "ref/train"))


def test_changed_dataset_or_effective_batch_is_refused_unless_forced(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, **KW)
    with pytest.raises(Crash):
        train(cfg, run, fault_hook=crash_at(5))
    with pytest.raises(TrainError, match="effective batch changed .4 → 8.*--resume-force"):
        train(tiny_cfg(tmp_path, **{**KW, "gradient_accumulation_steps": 4}), run, resume="auto")
    make_run(tmp_path, records16[:-2])
    with pytest.raises(TrainError, match="dataset changed"):
        train(cfg, run, resume="auto")
    m = train(cfg, run, resume="auto", resume_force=True)
    assert m["steps"] == 12
