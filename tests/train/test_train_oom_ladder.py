"""OOM ladder: injected torch.OutOfMemoryError → smaller micro-batch (same effective batch) → checkpointing; same result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.errors import TrainError
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


def test_the_last_rung_offloads_optimizer_state_and_activations_and_resumes(tmp_path, records16, monkeypatch):
    """micro-batch 1 + checkpointing still OOM → offload (host AdamW + saved activations); same weights as no OOM.

    Offload only frees memory on an accelerator, so on CPU the ladder does not offer it; the test makes it
    available to run the real mechanics (moments carried over, fp32 master copies, save_on_cpu) on this machine.
    """
    from train_helpers import Crash, crash_at

    import dsft.train.recipe as trainer_mod

    ref = make_run(tmp_path / "ref", records16)
    train(_cfg(tmp_path / "ref", per_device_train_batch_size=1, gradient_accumulation_steps=2, save_steps=2), ref)
    monkeypatch.setattr(trainer_mod, "offload_available", lambda device: True)
    fired = []

    def oom_twice_then_crash(step, micro):
        if step == 3 and len(fired) < 2:
            fired.append(step)
            raise torch.OutOfMemoryError("injected")
        crash_at(6)(step, micro)

    cfg = _cfg(tmp_path / "off", per_device_train_batch_size=1, gradient_accumulation_steps=2, save_steps=2)
    run = make_run(tmp_path / "off", records16)
    with pytest.raises(Crash):
        train(cfg, run, fault_hook=oom_twice_then_crash)
    log = _log(tmp_path / "off/train")
    actions = [r["action"] for r in log if r.get("event") == "oom"]
    assert actions[0] == "gradient checkpointing enabled" and actions[1].startswith("offload enabled")
    moved = [r for r in log if r.get("event") == "offload"]
    assert len(moved) == 1 and moved[0]["step"] == 3 and moved[0]["host_mib"] > 0
    state = json.loads((tmp_path / "off/train/checkpoints/checkpoint-4/state.json").read_text())
    assert state["offload"] is True and state["gradient_checkpointing"] is True
    m = train(cfg, run, resume="auto")  # the resumed run turns offload back on from the checkpoint
    assert m["steps"] == 6
    resumed = [r for r in _log(tmp_path / "off/train") if r.get("event") == "offload"]
    assert resumed[-1]["step"] == 4 and resumed[-1]["host_mib"] == moved[0]["host_mib"]
    _close(tmp_path / "off/train", tmp_path / "ref/train")


def test_on_cpu_the_ladder_ends_after_checkpointing_with_a_hint(tmp_path, records16):
    run = make_run(tmp_path / "end", records16)

    def always(step, micro):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(TrainError, match=r"out of memory at step 1 with micro-batch 1 and gradient checkpointing on: .*deepspeed"):
        train(_cfg(tmp_path / "end", per_device_train_batch_size=1, gradient_accumulation_steps=2), run, fault_hook=always)


def test_train_offload_true_offloads_from_the_first_step_where_it_frees_memory(tmp_path, records16, monkeypatch, capsys):
    import dsft.train.recipe as trainer_mod

    ref = make_run(tmp_path / "ref", records16)
    train(_cfg(tmp_path / "ref", per_device_train_batch_size=2), ref)
    cpu = make_run(tmp_path / "cpu", records16)
    train(_cfg(tmp_path / "cpu", per_device_train_batch_size=2, offload=True), cpu)
    assert "nothing to offload" in capsys.readouterr().out
    assert not [r for r in _log(tmp_path / "cpu/train") if r.get("event") == "offload"]
    monkeypatch.setattr(trainer_mod, "offload_available", lambda device: True)
    run = make_run(tmp_path / "on", records16)
    train(_cfg(tmp_path / "on", per_device_train_batch_size=2, offload=True), run)
    assert [r["step"] for r in _log(tmp_path / "on/train") if r.get("event") == "offload"] == [0]
    _close(tmp_path / "on/train", tmp_path / "ref/train")
