"""Resume hardening (issue 13): missing folder, only torn checkpoints, a non-safetensors file with a good checksum;
and the progress bar: shown on a terminal, silent when piped."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import Crash, crash_at, make_run, tiny_cfg

from dsft.errors import TrainError
from dsft.train import run as train_run

SRC = str(Path(__file__).resolve().parents[2] / "src")
KW = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2)


def _crashed_run(root: Path, records):
    run = make_run(root, records)
    cfg = tiny_cfg(root, **KW)
    with pytest.raises(Crash):
        train_run(cfg, run, fault_hook=crash_at(5), progress=False)
    return cfg, run, root / "train/checkpoints"


def _write_cfg(root: Path, records, **train) -> Path:
    make_run(root, records)
    p = root / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_cfg(root, **train).model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    return p


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}


def test_resume_from_a_missing_folder_says_checkpoint_not_found(tmp_path, records16):
    cfg_path = _write_cfg(tmp_path, records16, max_steps=2)
    missing = tmp_path / "no" / "such" / "dir"
    out = subprocess.run([sys.executable, "-m", "dsft", "train", str(cfg_path), "--resume", str(missing)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert f"checkpoint not found: {missing}" in out.stderr and "COMPLETE" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_resume_auto_refuses_when_every_checkpoint_is_torn(tmp_path, records16):
    cfg, run, root = _crashed_run(tmp_path, records16)
    ckpts = sorted(root.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-4"]
    for p in ckpts:
        (p / "COMPLETE").unlink()  # a crash while sealing each of them
    with pytest.raises(TrainError, match=r"every checkpoint is torn \(checkpoint-2, checkpoint-4\)") as e:
        train_run(cfg, run, resume="auto", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "train/manifest.json").exists()  # nothing restarted at step 0


def test_a_checkpoint_file_that_is_not_safetensors_is_one_line(tmp_path, records16):
    cfg, run, root = _crashed_run(tmp_path, records16)
    ck4 = root / "checkpoint-4"
    bad = ck4 / "optimizer.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + b"\0" * 64)
    seal = json.loads((ck4 / "COMPLETE").read_text())
    seal["optimizer.safetensors"] = {"sha256": hashlib.sha256(bad.read_bytes()).hexdigest(), "bytes": bad.stat().st_size}
    (ck4 / "COMPLETE").write_text(json.dumps(seal))  # the checksum matches: only the format is wrong
    with pytest.raises(TrainError, match=r"optimizer\.safetensors: not a readable safetensors file") as e:
        train_run(cfg, run, resume="auto", progress=False)
    assert "\n" not in str(e.value)


def _read_all(fd: int, timeout: float = 300) -> str:
    """Everything written to a pty master until the other side closes."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_and_not_when_piped(tmp_path, records16):
    cfg_path = _write_cfg(tmp_path, records16, max_steps=3)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "train", str(cfg_path), "--force"], env=_env(),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        tty_out = _read_all(master)
    finally:
        os.close(master)
    assert proc.wait(timeout=60) == 0, tty_out[-2000:]
    assert "train: 100%" in tty_out and "3/3" in tty_out and "step/s" in tty_out and "loss=" in tty_out, tty_out[-2000:]

    piped = subprocess.run([sys.executable, "-m", "dsft", "train", str(cfg_path), "--force"], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "step/s" not in piped.stderr + piped.stdout and "train: 100%" not in piped.stderr + piped.stdout
    assert "dsft train: 3 steps" in piped.stdout
