"""LoRA on a shipped FP8 DeepSeek-V3 folder: loss falls on the frozen e4m3 base, kill -9 + --resume auto is bit-exact,
the manifest records the base checkpoint (MTP kept aside), and methods that would train the FP8 weights are refused."""

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
from train_helpers import make_run, medical_records, tiny_cfg

from dsft.config import config_from_dict
from dsft.errors import TrainError
from dsft.model.shipped import write_shipped
from dsft.train import train


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return write_shipped(tmp_path_factory.mktemp("fp8") / "v3")


def _cfg(root: Path, model_dir: Path, **train_kw) -> dict:
    cfg = tiny_cfg(root, **train_kw).model_dump(mode="json")
    cfg["model"] = {"name_or_path": str(model_dir)}
    cfg["data"]["max_seq_length"] = 128
    return cfg


def _losses(stage: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_lora_loss_falls_on_the_fp8_base_and_the_manifest_records_it(tmp_path, fp8_dir):
    run = make_run(tmp_path, medical_records(1, with_label_task=False) * 2)
    cfg = _cfg(tmp_path, fp8_dir, max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=1,
               learning_rate=5e-3, lr_scheduler="constant", warmup_steps=0)
    m = train(config_from_dict(cfg), run, progress=False)
    losses = _losses(tmp_path / "train")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses  # the same batch every step
    assert m["method_info"]["targets"]["by_kind"]["routed_experts"] == 2 * 4 * 3
    assert m["total_params"] > 60_000_000  # the FP8 weights count although they are buffers
    bc = m["base_checkpoint"]
    assert bc["format"] == "fp8" and bc["block"] == [128, 128] and bc["shards"] == 3 and bc["index"]
    assert bc["mtp_layers"] == [3] and bc["mtp_prefixes"] == ["model.layers.3."] and bc["dir"] == str(fp8_dir.resolve())
    adapter = load_file(str(tmp_path / "train/adapter/adapter_model.safetensors"))
    assert any(".mlp.experts.3.down_proj.lora_B" in k for k in adapter)
    assert not any(".layers.3." in k for k in adapter)  # the MTP layer is not trained


def test_methods_that_would_train_fp8_weights_are_refused(tmp_path, fp8_dir):
    run = make_run(tmp_path, medical_records(1, with_label_task=False))
    for method in ("full", "freeze"):
        cfg = _cfg(tmp_path, fp8_dir, max_steps=1, method=method)
        with pytest.raises(TrainError, match=f"train.method {method}: .* FP8 checkpoint"):
            train(config_from_dict(cfg), run, progress=False, force=True)


def _cli(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-m", "dsft", "train", str(cfg_path), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _write(root: Path, fp8_dir: Path) -> Path:
    make_run(root, medical_records(6))
    p = root / "cfg.yaml"
    cfg = _cfg(root, fp8_dir, max_steps=10, save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return p


def test_kill_minus_9_then_resume_auto_is_bit_exact_on_the_fp8_base(tmp_path, fp8_dir):
    ref = _cli(_write(tmp_path / "ref", fp8_dir))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    assert "dsft: FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept, 3 shards" in out
    cfg = _write(tmp_path / "k", fp8_dir)
    log = tmp_path / "k/train/log.jsonl"
    proc = _cli(cfg)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "k/train/manifest.json").exists()
    res = _cli(cfg, "--resume", "auto")
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out
    assert _losses(tmp_path / "k/train") == _losses(tmp_path / "ref/train")
    a = load_file(str(tmp_path / "k/train/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref/train/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
