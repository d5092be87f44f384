"""The train stage with eval's during-training eval_fn, then the eval stage on its real adapter and log."""

from __future__ import annotations

import json

import pytest
from eval_helpers import real_records

from dsft.config import config_from_dict
from dsft.eval.during_training import make_eval_fn
from dsft.eval.stage import evaluate
from dsft.model.load import resolve_model_dir
from dsft.model.tokenizer import load_tokenizer
from dsft.run import RunDir, read_jsonl, write_jsonl
from dsft.train import train


@pytest.mark.slow
def test_train_with_eval_fn_then_evaluate(tmp_path):
    run = RunDir(tmp_path)
    d = run.stage_dir("data")
    train_recs, test_recs = real_records(24), real_records(4, start=600)
    write_jsonl(d / "train.jsonl", train_recs)
    write_jsonl(d / "test.jsonl", test_recs)
    labels = sorted({r["label"] for r in train_recs + test_recs})
    run.write_manifest("data", {"train": "train.jsonl", "test": "test.jsonl", "eval": None, "labels": labels,
                                "label_field": "domain", "counts": {"train": 24, "test": 4}})
    cfg = config_from_dict({
        "run_dir": str(tmp_path), "data": {"max_seq_length": 192},
        "train": {"max_steps": 8, "evaluation_strategy": "steps", "eval_steps": 4, "logging_steps": 1, "save_steps": 1000, "report_to": ["none"],
                  "per_device_train_batch_size": 4},
        "eval": {"during_training_metric": "rouge_l", "during_training_samples": 2, "max_new_tokens": 6,
                 "max_samples": 4, "samples_in_report": 2},
    })
    tok = load_tokenizer(str(resolve_model_dir(cfg.model.name_or_path)))
    eval_fn = make_eval_fn(cfg, test_recs, tok)
    tm = train(cfg, run, eval_fn=eval_fn)
    assert tm["steps"] == 8
    evals = [r for r in read_jsonl(tmp_path / "train" / "log.jsonl") if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [4, 8]
    assert all(0 <= e["eval_rouge_l"] <= 1 and e["eval_metric_value"] == e["eval_rouge_l"] for e in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # held-out answer loss falls while training

    m = evaluate(cfg, run)
    assert m["after"]["loss"] < m["before"]["loss"]  # the trained adapter, loaded by eval, fits unseen answers better
    assert m["pngs"]["loss"] == "loss.png"
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert ev["models"]["finetuned"]["answer_tokens"] == ev["models"]["base"]["answer_tokens"] > 0
