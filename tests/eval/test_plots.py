"""Loss curves from the train stage's log.jsonl rows, and the confusion-matrix PNG."""

from __future__ import annotations

from dsft.eval.plots import confusion_png, loss_curve_png, loss_series


def test_loss_series_reads_train_log_format():
    rows = [{"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": 2.5},
            {"step": 2, "event": "eval", "eval_loss": 2.7, "eval_rouge_l": 0.1},
            {"step": 2, "event": "early_stop", "eval_loss": 2.7}, {"step": 3, "event": "nan_loss", "loss": "nan"}]
    s = loss_series(rows)
    assert s == {"loss": ([1.0, 2.0], [3.0, 2.5]), "eval_loss": ([2.0], [2.7])}


def test_pngs_are_written(tmp_path):
    assert loss_curve_png([{"step": 1, "lr": 0.1}], tmp_path / "none.png") is None
    p = loss_curve_png([{"step": i, "loss": 1 / i} for i in range(1, 5)], tmp_path / "loss.png")
    c = confusion_png(["消化科", "神经科"], [[3, 1], [0, 2]], tmp_path / "cm.png", "true vs predicted")
    for f in (p, c):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 2000
