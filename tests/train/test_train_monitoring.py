"""Monitoring: NaN stops the run, loss-health rule, grad-norm spikes, early stopping (eval_fn and built-in eval loss)."""

from __future__ import annotations

import json

import pytest
from train_helpers import make_run, medical_records, tiny_cfg

from dsft.config import TrainConfig
from dsft.errors import TrainError
from dsft.train import train
from dsft.train.monitor import Monitor


def _events(stage, kind):
    return [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines() if f'"event": "{kind}"' in ln]


def test_nan_loss_stops_with_step_and_hint(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, max_steps=40, learning_rate=1e4, lr_scheduler="constant", warmup_ratio=0.0,
                   max_grad_norm=1e30)
    with pytest.raises(TrainError, match=r"training loss is (nan|inf) at step \d+: stopped. Hints: lower train.learning_rate"):
        train(cfg, run)
    assert _events(tmp_path / "train", "nan_loss")
    assert not (tmp_path / "train/manifest.json").exists()


def test_loss_health_rule_is_logged_once(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, max_steps=8, loss_health_steps=4, loss_health_ratio=0.01, per_device_train_batch_size=2)
    train(cfg, run)
    health = _events(tmp_path / "train", "loss_health")
    assert len(health) == 1 and health[0]["step"] == 4 and "did not fall below 1%" in health[0]["rule"]


def test_grad_norm_spike_is_logged(tmp_path):
    mon = Monitor(tmp_path, TrainConfig(report_to=["none"]))
    for s in range(1, 13):
        mon.step({"step": s, "loss": 2.0, "grad_norm": 1.0 + 0.01 * s})
    mon.step({"step": 13, "loss": 2.0, "grad_norm": 30.0})
    spikes = _events(tmp_path, "grad_norm_spike")
    assert [(e["step"], e["grad_norm"]) for e in spikes] == [(13, 30.0)]


def test_early_stopping_with_an_eval_hook(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, max_steps=20, evaluation_strategy="steps", eval_steps=2, early_stopping_patience=2,
                   early_stopping_delta=0.01, per_device_train_batch_size=2)
    seen = []

    def eval_fn(model, step):
        seen.append(step)
        return {"eval_loss": [3.0, 2.5, 2.495, 2.6, 2.0][len(seen) - 1]}  # no gain > delta twice → stop at the 4th

    m = train(cfg, run, eval_fn=eval_fn)
    assert seen == [2, 4, 6, 8] and m["steps"] == 8 and m["early_stopped"]
    assert _events(tmp_path / "train", "early_stop")[0]["step"] == 8
    assert (tmp_path / "train/checkpoints/checkpoint-8").exists()


def test_builtin_eval_loss_on_the_eval_split(tmp_path, records16):
    run = make_run(tmp_path, records16, eval_records=medical_records(12)[16:])
    cfg = tiny_cfg(tmp_path, max_steps=4, eval_steps=2, evaluation_strategy="steps", per_device_train_batch_size=4)
    train(cfg, run)
    evals = _events(tmp_path / "train", "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(e["eval_loss"] > 0 for e in evals)


def test_early_stopping_follows_the_hooks_metric_and_direction(tmp_path, records16):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, max_steps=20, evaluation_strategy="steps", eval_steps=2, early_stopping_patience=2,
                   early_stopping_delta=0.01, per_device_train_batch_size=2)
    seen = []

    def eval_fn(model, step):
        seen.append(step)
        return {"eval_loss": 1.0, "eval_rouge_l": [0.1, 0.2, 0.205, 0.19, 0.5][len(seen) - 1]}

    eval_fn.metric, eval_fn.greater_is_better = "eval_rouge_l", True
    m = train(cfg, run, eval_fn=eval_fn)
    assert seen == [2, 4, 6, 8] and m["early_stopped"]
    ev = _events(tmp_path / "train", "early_stop")[0]
    assert ev["metric"] == "eval_rouge_l" and ev["best"] == 0.2
