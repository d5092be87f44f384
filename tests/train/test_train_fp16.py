"""fp16 mixed precision (issue 14): autocast fp16 + GradScaler loss scaling + fp32 master weights, LoRA and full,
on CPU (torch's CPU autocast runs float16); the scaler's state travels in checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run, tiny_cfg

from dsft.train import run as train_run

KW = dict(precision="fp16", max_steps=8, save_steps=3, per_device_train_batch_size=2)


def _losses(stage: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def _falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2


def _reseal(ck: Path, name: str) -> None:
    seal = json.loads((ck / "COMPLETE").read_text())
    p = ck / name
    seal[name] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
    (ck / "COMPLETE").write_text(json.dumps(seal))


def test_fp16_lora_trains_and_resumes_bit_exact_with_the_scaler_state(tmp_path, records16):
    ref = make_run(tmp_path / "ref", records16)
    m = train_run(tiny_cfg(tmp_path / "ref", **KW), ref, progress=False)
    assert m["precision"] == "fp16" and m["grad_scaler"]["scale"] > 1
    ref_losses = _losses(tmp_path / "ref/train")
    assert _falls(ref_losses), ref_losses
    st = json.loads((tmp_path / "ref/train/checkpoints/checkpoint-6/state.json").read_text())
    assert st["grad_scaler"]["scale"] == m["grad_scaler"]["scale"] and "_growth_tracker" in st["grad_scaler"]

    run = make_run(tmp_path / "k", records16)
    cfg = tiny_cfg(tmp_path / "k", **KW)
    with pytest.raises(Crash):
        train_run(cfg, run, fault_hook=crash_at(5), progress=False)
    m2 = train_run(cfg, run, resume="auto", progress=False)
    assert m2["steps"] == 8 and _losses(tmp_path / "k/train") == ref_losses
    a, b = (load_file(str(tmp_path / d / "train/adapter/adapter_model.safetensors")) for d in ("ref", "k"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the resumed scaler is the checkpoint's, not a fresh one: a scale written into the checkpoint comes back
    run3 = make_run(tmp_path / "s", records16)
    cfg3 = tiny_cfg(tmp_path / "s", **KW)
    with pytest.raises(Crash):
        train_run(cfg3, run3, fault_hook=crash_at(5), progress=False)
    ck = tmp_path / "s/train/checkpoints/checkpoint-3"
    st = json.loads((ck / "state.json").read_text())
    st["grad_scaler"]["scale"] = 1024.0
    (ck / "state.json").write_text(json.dumps(st))
    _reseal(ck, "state.json")
    assert train_run(cfg3, run3, resume="auto", progress=False)["grad_scaler"]["scale"] == 1024.0


def test_fp16_full_finetuning_keeps_fp32_master_weights(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, method="full", precision="fp16", max_steps=8, per_device_train_batch_size=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float16"})})  # a 16-bit base
    m = train_run(cfg, run, progress=False)
    assert m["precision"] == "fp16" and _falls(_losses(tmp_path / "train"))
    weights = load_file(str(tmp_path / "train/model/model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # trained in fp32 masters, not in fp16
