"""Two processes on CPU (gloo) through `dsft train --nproc 2` (accelerate): same loss curve as one process at the
same global batch, and a 2-process checkpoint resumes in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.train import train
from dsft.train.dist import accelerate_config

pytestmark = pytest.mark.slow


def _cfg(root, **kw):
    c = tiny_cfg(root, max_steps=6, save_steps=3, per_device_train_batch_size=2, **kw).model_dump(mode="json")
    c["lora"]["dropout"] = 0.0
    return c


def _losses(stage: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


def test_ddp_two_processes_match_one_and_resume_in_one(tmp_path, records16):
    make_run(tmp_path / "ddp", records16)
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(tmp_path / "ddp")), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-m", "dsft", "train", str(cfg_path), "--nproc", "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m2 = json.loads((tmp_path / "ddp/train/manifest.json").read_text())
    assert m2["processes"] == {"world": 2, "kind": "MULTI_CPU"} and m2["effective_batch"] == 4
    assert (tmp_path / "ddp/accelerate_multi_gpu.yaml").exists()

    one = make_run(tmp_path / "one", records16)
    train(config_from_dict(_cfg(tmp_path / "one", gradient_accumulation_steps=2)), one)
    l2, l1 = _losses(tmp_path / "ddp/train"), _losses(tmp_path / "one/train")
    assert l2.keys() == l1.keys() == set(range(1, 7))
    assert max(abs(l2[k] - l1[k]) for k in l1) < 1e-4

    res = make_run(tmp_path / "res", records16)
    m = train(config_from_dict(_cfg(tmp_path / "res", gradient_accumulation_steps=2)), res,
              resume=str(tmp_path / "ddp/train/checkpoints/checkpoint-3"))
    assert m["steps"] == 6
    lr = _losses(tmp_path / "res/train")
    assert set(lr) == {4, 5, 6} and max(abs(lr[k] - l2[k]) for k in lr) < 1e-4


def test_generated_fsdp_and_deepspeed_configs():
    tc = config_from_dict({"train": {"strategy": "deepspeed", "zero_stage": 3, "offload": True, "nproc": 8,
                                     "num_machines": 2, "main_process_ip": "10.0.0.1"}}).train
    ds = accelerate_config(tc, n_gpu=8, mixed_precision="bf16")
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_processes"] == 16 and ds["main_process_ip"] == "10.0.0.1"
    assert ds["deepspeed_config"]["zero_stage"] == 3 and ds["deepspeed_config"]["offload_param_device"] == "cpu"
    tc = config_from_dict({"train": {"strategy": "fsdp", "nproc": 4}}).train
    fs = accelerate_config(tc, n_gpu=4, layer_cls="DeepseekV3DecoderLayer")
    assert fs["distributed_type"] == "FSDP"
    assert fs["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "DeepseekV3DecoderLayer"
