"""The data stage end to end on real files: manifest contract, accounting, split, derived label task, --force."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dsft.config import config_from_dict, load_config
from dsft.data.stage import run as prepare
from dsft.errors import OverwriteError
from dsft.run import RunDir, read_jsonl

MANIFEST_KEYS = {"stage", "train", "test", "eval", "report", "counts", "labels", "label_field"}
COUNT_KEYS = {"input", "kept", "dropped", "train", "test", "eval", "derived"}


def _cfg(tmp_path, **data):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "data": data})


def test_embedded_medical_contract(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir(cfg.run_dir)
    m = prepare(cfg, run)
    on_disk = json.loads((run.root / "data" / "manifest.json").read_text(encoding="utf-8"))
    assert set(on_disk) == MANIFEST_KEYS
    assert set(m["counts"]) == COUNT_KEYS
    c = m["counts"]
    assert c["input"] == 1667
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    assert c["dropped"].get("duplicate_exact", 0) > 0
    assert c["kept"] == c["train"] + c["test"] + c["eval"]
    assert 1600 <= c["kept"] <= 1640
    assert m["label_field"] == "domain"
    assert m["labels"] == sorted(m["labels"]) and len(m["labels"]) == 11
    d = run.root / "data"
    train, test = read_jsonl(d / m["train"]), read_jsonl(d / m["test"])
    assert read_jsonl(d / m["eval"]) == []
    orig = [r for r in train if r["provenance"] == "original"]
    derived = [r for r in train if r["provenance"] == "derived:label_task"]
    assert len(orig) == c["train"] and len(derived) == c["derived"] == c["train"]
    assert all(r["provenance"] == "original" for r in test)
    # the derived record asks for the department and answers with the label
    assert "科室" in derived[0]["messages"][-2]["content"] and derived[0]["messages"][-1]["content"] == derived[0]["label"]
    # every label with ≥ 3 kept records is in test (stratified), and test ≈ 10 %
    kept_labels = Counter(r["label"] for r in orig + test)
    test_labels = Counter(r["label"] for r in test)
    assert all(test_labels[k] >= 1 for k, n in kept_labels.items() if n >= 3)
    assert abs(len(test) / c["kept"] - 0.1) < 0.02
    # no id in both train and test; canonical record shape
    assert not {r["id"] for r in orig} & {r["id"] for r in test}
    r0 = test[0]
    assert set(r0) >= {"id", "messages", "fields", "label", "domain", "source", "provenance"}
    assert r0["messages"][0]["role"] == "user" and r0["messages"][-1]["role"] == "assistant"
    assert r0["source"]["file"] == "embedded:medical" and r0["source"]["line"] >= 2
    rep = json.loads((d / m["report"]).read_text(encoding="utf-8"))
    assert rep["accounting_holds"] and rep["files"][0]["encoding"] == "gb18030"
    assert (d / "data_report.md").read_text(encoding="utf-8").count("|") > 20
    dups = read_jsonl(d / "duplicates.jsonl")
    assert len(dups) == c["dropped"]["duplicate_exact"] + c["dropped"].get("near_duplicate", 0)
    assert all(x["duplicate_of"] < x["index"] for x in dups)
    assert c["dropped"].get("near_duplicate", 0) > 0  # the shipped subset has template replies that differ a little


def test_deterministic_and_refuses_overwrite(tmp_path):
    cfg = _cfg(tmp_path, report_plots=False)
    run = RunDir(cfg.run_dir)
    prepare(cfg, run)
    first = (run.root / "data" / "train.jsonl").read_bytes(), (run.root / "data" / "test.jsonl").read_bytes()
    with pytest.raises(OverwriteError):
        prepare(cfg, run)
    prepare(cfg, run, force=True)
    assert ((run.root / "data" / "train.jsonl").read_bytes(), (run.root / "data" / "test.jsonl").read_bytes()) == first
    other = _cfg(tmp_path / "o", seed=7, report_plots=False)
    prepare(other, RunDir(other.run_dir))
    assert (RunDir(other.run_dir).root / "data" / "test.jsonl").read_bytes() != first[1]


def test_real_gb18030_csv_via_seed_layout(tmp_path, medical_csv):
    p = tmp_path / "seed.yaml"
    p.write_text(f"model_name: embedded:tiny-deepseek-v3\ntraining_args:\n  output_dir: {tmp_path / 'run'}\n"
                 f"data_args:\n  dataset_path: {medical_csv}\n  test_size: 0.2\n", encoding="utf-8")
    cfg = load_config(p, {"data.columns": {"question": "title", "context": "ask", "answer": "answer", "domain": "department"}})
    m = prepare(cfg, RunDir(cfg.run_dir))
    c = m["counts"]
    assert c["input"] == 7644 and c["input"] == c["kept"] + sum(c["dropped"].values())
    assert c["dropped"]["duplicate_exact"] >= 300  # the README: ~400 answers are exact duplicates
    assert abs(c["test"] / c["kept"] - 0.2) < 0.01
    assert len(m["labels"]) == 11
    # exact and near duplicates are both listed, each with its partner (which was kept)
    d = RunDir(cfg.run_dir).root / "data"
    dups = read_jsonl(d / "duplicates.jsonl")
    assert {x["method"] for x in dups} == {"exact", "minhash"} and c["dropped"]["near_duplicate"] > 10
    removed = {x["id"] for x in dups}
    assert all(x["duplicate_of_id"] not in removed for x in dups)
    near = [x for x in dups if x["method"] == "minhash"]
    assert all(0.8 <= x.get("matched_jaccard", x["jaccard"]) <= 1.0 for x in near)
    assert any("matched_id" in x for x in near)  # chains are explained: the confirmed partner is named too


def test_alpaca_and_sharegpt_together(tmp_path, alpaca_json, sharegpt_json):
    cfg = _cfg(tmp_path, path=[str(alpaca_json), str(sharegpt_json)], label_field=None)
    m = prepare(cfg, RunDir(cfg.run_dir))
    c = m["counts"]
    assert c["input"] == 1300 and c["input"] == c["kept"] + sum(c["dropped"].values())
    assert c["derived"] == 0 and m["labels"] == []
    recs = read_jsonl(RunDir(cfg.run_dir).root / "data" / "train.jsonl")
    tool = [r for r in recs if r["tools"]]
    assert tool and any(msg["role"] == "tool" for r in tool for msg in r["messages"])
    assert all(isinstance(msg["content"], str) for r in recs for msg in r["messages"])


def test_eval_split_is_stratified_deterministic_and_reported(tmp_path):
    cfg = _cfg(tmp_path, eval_size=0.1, report_plots=False)
    m = prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    c = m["counts"]
    train = [r for r in read_jsonl(d / "train.jsonl") if r["provenance"] == "original"]
    test, ev = read_jsonl(d / "test.jsonl"), read_jsonl(d / "eval.jsonl")
    assert abs(c["eval"] / c["kept"] - 0.1) < 0.02 and c["eval"] == len(ev) and c["kept"] == len(train) + len(test) + len(ev)
    assert not {r["id"] for r in ev} & ({r["id"] for r in train} | {r["id"] for r in test})
    per_label = Counter(r["label"] for r in train + test + ev)
    got = Counter(r["label"] for r in ev)
    for lab, n in per_label.items():  # every class gives its own share: round(n × 0.1), ≥ 1 from 4 records
        n_test = max(round(n * 0.1), 1 if n >= 3 else 0)
        assert got[lab] == min(max(round(n * 0.1), 1 if n >= 4 else 0), max(0, n - n_test - 1)), (lab, n, got[lab])
    rep = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    assert rep["eval_split"] == {"records": c["eval"], "eval_size": 0.1, "seed": 42, "stratified_by": "domain"}
    assert f"Eval split: {c['eval']} records (data.eval_size 0.1, stratified by `domain`, seed 42)" in \
        (d / "data_report.md").read_text(encoding="utf-8")
    first = (d / "eval.jsonl").read_bytes()
    prepare(cfg, RunDir(cfg.run_dir), force=True)
    assert (d / "eval.jsonl").read_bytes() == first  # deterministic by data.seed
    other = _cfg(tmp_path / "o", eval_size=0.1, seed=7, report_plots=False)
    prepare(other, RunDir(other.run_dir))
    assert (RunDir(other.run_dir).root / "data" / "eval.jsonl").read_bytes() != first


def test_eval_split_without_a_label_field(tmp_path, alpaca_json):
    cfg = _cfg(tmp_path, path=str(alpaca_json), label_field=None, eval_size=0.2, report_plots=False)
    m = prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    assert m["counts"]["eval"] == round(m["counts"]["kept"] * 0.2)
    rep = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    assert rep["eval_split"]["stratified_by"] is None
    assert "not stratified (no label field)" in (d / "data_report.md").read_text(encoding="utf-8")
