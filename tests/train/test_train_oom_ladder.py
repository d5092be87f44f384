"""OOM ladder: injected torch.OutOfMemoryError → smaller micro-batch (same effective batch) → checkpointing; same result."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.train import train


def _cfg(root, **kw):
    c = tiny_cfg(root, max_steps=6, **kw).model_dump()
    c["lora"]["dropout"] = 0.0
    return config_from_dict(c)


def _log(stage):
    return [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines()]


def _close(a, b, tol=1e-3):
    """Same weights up to fp summation order (Adam amplifies last-bit gradient noise, so compare norms)."""
    wa = load_file(str(a / "adapter/adapter_model.safetensors"))
    wb = load_file(str(b / "adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = sum(float((wa[k] - wb[k]).double().norm() ** 2) for k in wa) ** 0.5
    ref = sum(float(wb[k].double().norm() ** 2) for k in wb) ** 0.5
    assert diff / ref < tol, diff / ref
    la = [r["loss"] for r in _log(a) if "loss" in r and "event" not in r]
    lb = [r["loss"] for r in _log(b) if "loss" in r and "event" not in r]
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4


def test_halving_micro_batch_matches_a_run_at_the_smaller_micro_batch(tmp_path, records16):
    ref = make_run(tmp_path / "ref", records16)
    train(_cfg(tmp_path / "ref", per_device_train_batch_size=1, gradient_accumulation_steps=4), ref)

    run = make_run(tmp_path / "oom", records16)

    def oom(step, micro):
        if step == 3 and micro > 1:
            raise torch.OutOfMemoryError("injected")

    m = train(_cfg(tmp_path / "oom", per_device_train_batch_size=4), run, fault_hook=oom)
    log = _log(tmp_path / "oom/train")
    events = [r["action"] for r in log if r.get("event") == "oom"]
    assert len(events) == 2 and "halved to 2" in events[0] and "halved to 1" in events[1]
    assert m["micro_batch"] == 1 and m["effective_batch"] == 4 and m["steps"] == 6
    steps = [r for r in log if "loss" in r and "event" not in r]
    ref_steps = [r for r in _log(tmp_path / "ref/train") if "loss" in r and "event" not in r]
    assert [r["tokens"] for r in steps] == [r["tokens"] for r in ref_steps]  # no sample skipped or repeated
    _close(tmp_path / "oom/train", tmp_path / "ref/train")


def test_at_micro_batch_one_the_ladder_turns_on_gradient_checkpointing(tmp_path, records16):
    ref = make_run(tmp_path / "ref", records16)
    train(_cfg(tmp_path / "ref", per_device_train_batch_size=1, gradient_accumulation_steps=2), ref)
    run = make_run(tmp_path / "gc", records16)
    fired = []

    def oom_once(step, micro):
        if step == 2 and not fired:
            fired.append(step)
            raise torch.OutOfMemoryError("injected")

    train(_cfg(tmp_path / "gc", per_device_train_batch_size=1, gradient_accumulation_steps=2), run, fault_hook=oom_once)
    events = [r["action"] for r in _log(tmp_path / "gc/train") if r.get("event") == "oom"]
    assert events == ["gradient checkpointing enabled"]
    _close(tmp_path / "gc/train", tmp_path / "ref/train")
