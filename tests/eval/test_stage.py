"""The eval stage end to end on a real tiny DeepSeek-V3 + real PEFT adapter + real medical records."""

from __future__ import annotations

import json
import re

import pytest
from eval_helpers import make_run, real_records

from dsft.config import config_from_dict
from dsft.errors import OverwriteError
from dsft.eval import evaluate
from dsft.run import read_jsonl


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    records = real_records(12, per_label=2)
    run = make_run(tmp_path_factory.mktemp("run"), tiny_model_dir, tiny_adapter_dir, records)
    cfg = config_from_dict({"run_dir": str(run.root), "eval": {"max_samples": 10, "max_new_tokens": 12, "batch_size": 4}})
    manifest = evaluate(cfg, run)
    return cfg, run, manifest


def test_manifest_has_contract_keys(finished_run):
    _, run, m = finished_run
    for side in ("before", "after"):
        for k in ("loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1"):
            assert isinstance(m[side][k], float), (side, k)
    assert re.fullmatch(r"accuracy \d+ % → \d+ %", m["headline"])
    assert json.loads((run.root / "eval" / "manifest.json").read_text())["stage"] == "eval"
    assert (run.root / "eval" / m["eval_json"]).exists()
    png = (run.root / "eval" / m["loss_png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_changes_the_numbers(finished_run):
    _, _, m = finished_run
    assert m["before"]["loss"] != pytest.approx(m["after"]["loss"], abs=1e-6)
    assert m["before"]["perplexity"] == pytest.approx(__import__("math").exp(m["before"]["loss"]))


def test_predictions_file_agrees_with_metrics(finished_run):
    _, run, m = finished_run
    rows = read_jsonl(run.root / "eval" / "predictions.jsonl")
    for model, side in (("base", "before"), ("finetuned", "after")):
        gen = [r for r in rows if r["model"] == model and r["task"] == "generation"]
        cls = [r for r in rows if r["model"] == model and r["task"] == "classification"]
        assert len(gen) == len(cls) == m["n"] == 10
        acc = sum(r["label"] == r["prediction"] for r in cls) / len(cls)
        assert acc == pytest.approx(m[side]["accuracy"], abs=1e-9)
        for r in cls:
            assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4)
            assert r["prediction"] == max(r["scores"], key=r["scores"].get)
        from dsft.eval.metrics import rouge_l

        assert rouge_l([r["prediction"] for r in gen], [r["reference"] for r in gen], "zh") == pytest.approx(m[side]["rouge_l"], abs=1e-9)


def test_refuses_to_overwrite_without_force(finished_run):
    cfg, run, _ = finished_run
    with pytest.raises(OverwriteError, match="--force"):
        evaluate(cfg, run)
