"""`dsft train` asks the memory planner first: the plan is printed and saved, `auto` batch keeps the effective batch."""

from __future__ import annotations

from train_helpers import make_run, medical_records, tiny_cfg

from dsft.train import train


def test_auto_micro_batch_comes_from_the_planner_and_keeps_the_effective_batch(tmp_path, capsys):
    run = make_run(tmp_path, medical_records(8))
    cfg = tiny_cfg(tmp_path, max_steps=2, per_device_train_batch_size="auto")
    cfg.plan.effective_batch_size = 8
    m = train(cfg, run)
    out = capsys.readouterr().out
    assert "per-GPU peak memory" in out and "verdict: FITS" in out
    assert (tmp_path / "train" / "plan.txt").read_text().startswith("dsft plan")
    assert m["effective_batch"] == 8  # the planner picks the micro-batch; accumulation keeps 8
    assert 1 <= m["micro_batch"] <= 8 and 8 % m["micro_batch"] == 0


def test_a_setup_that_does_not_fit_is_warned_about(tmp_path, capsys):
    run = make_run(tmp_path, medical_records(4))
    cfg = tiny_cfg(tmp_path, max_steps=1, per_device_train_batch_size=8)
    cfg.plan.gpu = "1GB"  # far too small for micro-batch 8 × seq 4096 with an 8 k vocabulary
    cfg.data.max_seq_length = 4096
    train(cfg, run)
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "warning: the planner estimates" in out
