"""make_eval_fn: eval loss + a generation metric on a fixed subset, the configurable early-stopping metric."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import real_records
from transformers import AutoModelForCausalLM

from dsft.config import config_from_dict
from dsft.errors import ConfigError
from dsft.eval.during_training import is_improvement, make_eval_fn
from dsft.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), load_tokenizer(str(tiny_model_dir))


def test_loss_metric_fixed_subset_and_mode_restored(model_tok):
    model, tok = model_tok
    cfg = config_from_dict({"eval": {"during_training_samples": 4, "max_new_tokens": 4}})
    recs = real_records(20)
    fn = make_eval_fn(cfg, recs, tok)
    assert fn.subset_ids == make_eval_fn(cfg, recs, tok).subset_ids and len(fn.subset_ids) == 4
    model.train()
    a = fn(model, 10)
    assert model.training  # restored
    assert fn.metric == "eval_loss" and fn.greater_is_better is False and a["eval_metric_value"] == a["eval_loss"] > 0
    assert all(isinstance(v, int | float) for v in a.values())  # loggable as scalars (TensorBoard, log.jsonl)
    assert "eval_rouge_l" not in a  # no generation needed for a loss metric
    assert fn(model)["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)  # deterministic (dropout off while scoring)


def test_generation_metric_and_improvement(model_tok):
    model, tok = model_tok
    cfg = config_from_dict({"eval": {"during_training_metric": "rouge_l", "during_training_samples": 3, "max_new_tokens": 6}})
    fn = make_eval_fn(cfg, real_records(10), tok)
    res = fn(model, 5)
    assert fn.metric == "eval_rouge_l" and fn.greater_is_better is True
    assert res["eval_metric_value"] == res["eval_rouge_l"] and 0.0 <= res["eval_rouge_l"] <= 1.0
    assert {"eval_bleu", "eval_f1", "eval_em", "eval_loss"} <= res.keys() and len(fn.last_predictions) == 3
    assert is_improvement(0.3, 0.2, True) and not is_improvement(0.2, 0.3, True)
    assert is_improvement(1.0, 2.0, False) and not is_improvement(1.95, 2.0, False, delta=0.1)
    assert is_improvement(5.0, None, False)


def test_unknown_metric_is_config_error(model_tok):
    with pytest.raises(ConfigError, match="during_training_metric"):
        make_eval_fn(config_from_dict({}), real_records(3), model_tok[1], metric="accuracy_at_5")
