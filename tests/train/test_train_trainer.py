"""The train stage end to end on the tiny DeepSeek-V3: loss falls, manifest contract, bit-exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run, medical_records, tiny_cfg

from dsft.errors import OverwriteError
from dsft.train import train


def test_loss_falls_on_a_fixed_batch_and_manifest_matches_contract(tmp_path):
    recs = medical_records(4)  # 8 records = one effective batch: every step sees the same batch
    run = make_run(tmp_path, recs)
    cfg = tiny_cfg(tmp_path, max_steps=15, learning_rate=3e-3, lr_scheduler="constant", warmup_ratio=0.0)
    m = train(cfg, run)
    assert m["loss_last_step"] < 0.6 * m["loss_first"]
    for key in ("base_model", "method", "adapter", "model", "steps", "loss_first", "loss_last", "log", "loss_png",
                "tokens_per_s", "trainable_params"):
        assert key in m
    st = tmp_path / "train"
    assert m["steps"] == 15 and m["method"] == "lora" and m["model"] is None
    assert (st / m["adapter"] / "adapter_model.safetensors").exists()
    assert (st / m["loss_png"]).stat().st_size > 1000
    assert len([ln for ln in (st / "log.jsonl").read_text().splitlines() if '"loss"' in ln]) == 15
    assert json.loads((st / "manifest.json").read_text())["stage"] == "train"
    with pytest.raises(OverwriteError):
        train(cfg, run)


def _losses(stage):
    return [json.loads(ln)["loss"] for ln in (stage / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_resume_continues_step_count_and_reproduces_the_loss_curve(tmp_path, records16):
    kw = dict(max_steps=9, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ra = make_run(tmp_path / "a", records16)
    ma = train(tiny_cfg(tmp_path / "a", **kw), ra)

    rb = make_run(tmp_path / "b", records16)
    cfg_b = tiny_cfg(tmp_path / "b", **kw)

    with pytest.raises(Crash):
        train(cfg_b, rb, fault_hook=crash_at(7))
    ckpts = sorted(p.name for p in (tmp_path / "b/train/checkpoints").iterdir())
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    with pytest.raises(OverwriteError, match="--resume auto"):
        train(cfg_b, rb)
    mb = train(cfg_b, rb, resume="auto")
    assert mb["steps"] == ma["steps"] == 9
    assert _losses(tmp_path / "b/train") == _losses(tmp_path / "a/train")  # bitwise, incl. dropout
    wa = load_file(str(tmp_path / "a/train/adapter/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b/train/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
