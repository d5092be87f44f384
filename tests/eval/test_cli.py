"""`dsft eval CONFIG` and `dsft eval score FILE` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from eval_helpers import make_run, real_records

from dsft.cli import main


def test_eval_config_cli_full_finetune(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(4, per_label=1))
    # full fine-tuning manifest: a complete model folder instead of an adapter
    shutil.copytree(tiny_model_dir, run.root / "train" / "model")
    m = json.loads((run.root / "train" / "manifest.json").read_text())
    m.update(method="full", adapter=None, model="model")
    (run.root / "train" / "manifest.json").write_text(json.dumps(m))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run.root), "eval": {"max_samples": 4, "max_new_tokens": 6}}))
    assert main(["eval", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "→" in out
    man = json.loads((run.root / "eval" / "manifest.json").read_text())
    # the same weights before and after → identical numbers
    assert man["before"]["loss"] == pytest.approx(man["after"]["loss"], abs=1e-6)
    assert man["before"]["accuracy"] == man["after"]["accuracy"]
    assert main(["eval", str(cfg)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["eval", str(cfg), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4


def test_eval_without_train_stage_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "empty")}))
    assert main(["eval", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsft: error:") and "data" in err and len(err.splitlines()) == 1


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_hand_written_file(tmp_path, capsys):
    p = _write(tmp_path / "p.jsonl", [
        {"prediction": "多喝水，注意休息。", "reference": "多喝水，注意休息。"},
        {"prediction": "建议去医院检查", "reference": "建议到医院做检查"},
        {"label": "消化科", "prediction": "消化科", "scores": {"消化科": 0.7, "神经科": 0.3}},
        {"label": "神经科", "prediction": "消化科", "scores": {"消化科": 0.6, "神经科": 0.4}},
    ])
    assert main(["eval", "score", str(p), "--metrics", "bleu,rouge_l,em,accuracy,macro_f1,auc", "--lang", "zh", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["em"] == 0.5 and res["accuracy"] == 0.5 and res["auc"] == 1.0
    assert 0.5 < res["rouge_l"] < 1.0 and 0 < res["bleu"] < 1
    assert main(["eval", "score", str(p), "--metrics", "rouge_l,accuracy"]) == 0
    table = capsys.readouterr().out
    assert "rouge_l" in table and "accuracy" in table and "0.5000" in table


def test_score_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "a", "reference": "a"}\n{oops\n', encoding="utf-8")
    assert main(["eval", "score", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main(["eval", "score", str(bad), "--metrics", "bleu,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    missing = _write(tmp_path / "m.jsonl", [{"prediction": "x"}])
    assert main(["eval", "score", str(missing)]) == 2
    assert f"{missing}:1" in capsys.readouterr().err


def test_vllm_backend_absent_is_one_line_error(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    from dsft.eval.vllm_backend import vllm_available

    if vllm_available():
        pytest.skip("vllm and a GPU are present here")
    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(2))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run.root)}))
    assert main(["eval", str(cfg), "--set", "eval.backend=vllm"]) == 2
    err = capsys.readouterr().err
    assert "eval.backend" in err and len(err.strip().splitlines()) == 1
    assert not (run.root / "eval" / "manifest.json").exists()


def test_no_base_and_no_label_prompt(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(3))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run.root), "data": {"label_prompt": None},
                                   "eval": {"compare_base": False, "max_new_tokens": 4}}))
    assert main(["eval", str(cfg)]) == 0
    m = json.loads((run.root / "eval" / "manifest.json").read_text())
    assert m["before"] == {} and m["after"]["accuracy"] is None and m["models"] == ["finetuned"]
    assert m["headline"] == "fine-tuned model evaluated (no base comparison)"
    assert "<th>finetuned</th>" in (run.root / "eval" / "report.html").read_text()


def test_unknown_eval_metric_is_config_error(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(2))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run.root), "eval": {"metrics": ["rouge_l", "bleurt"]}}))
    assert main(["eval", str(cfg)]) == 2
    assert "eval.metrics" in capsys.readouterr().err and not (run.root / "eval" / "manifest.json").exists()


def test_labels_from_test_split_when_manifest_has_none(tmp_path, tiny_model_dir, tiny_adapter_dir):
    from dsft.config import config_from_dict
    from dsft.eval.stage import evaluate

    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(4, per_label=1))
    dm = json.loads((run.root / "data" / "manifest.json").read_text())
    dm.pop("labels")
    (run.root / "data" / "manifest.json").write_text(json.dumps(dm))
    m = evaluate(config_from_dict({"run_dir": str(run.root), "eval": {"max_new_tokens": 2, "compare_base": False}}), run)
    assert isinstance(m["after"]["accuracy"], float)
    ev = json.loads((run.root / "eval" / "eval.json").read_text())
    assert ev["labels"] == sorted({r["label"] for r in real_records(4, per_label=1)})
