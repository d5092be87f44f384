"""`data.streaming: true`: the same cleaning decisions as in memory, with constant state per record."""

from __future__ import annotations

import json
from collections import Counter

from dsft.config import config_from_dict
from dsft.data import prepare
from dsft.run import RunDir, read_jsonl


def _run(tmp_path, name: str, **data) -> tuple[dict, dict]:
    cfg = config_from_dict({"run_dir": str(tmp_path / name), "data": {"report_plots": False, "batch_size": 700, **data}})
    m = prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    files = {f: read_jsonl(d / f) for f in ("train.jsonl", "test.jsonl", "eval.jsonl", "rejected.jsonl", "duplicates.jsonl")}
    files["report"] = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    return m, files


def test_streaming_makes_the_same_cleaning_decisions(tmp_path, medical_csv):
    common = {"path": str(medical_csv), "eval_size": 0.05, "quality": {"require_terminal_punctuation": True}}
    m1, mem = _run(tmp_path, "mem", **common)
    m2, st = _run(tmp_path, "stream", streaming=True, shuffle_buffer=500, **common)
    assert m1["counts"]["input"] == m2["counts"]["input"] == 7644
    assert m1["counts"]["dropped"] == m2["counts"]["dropped"] and m1["counts"]["kept"] == m2["counts"]["kept"]
    assert mem["duplicates.jsonl"] == st["duplicates.jsonl"]  # same pairs, same partners, same Jaccard
    assert sorted(r["id"] for r in mem["rejected.jsonl"]) == sorted(r["id"] for r in st["rejected.jsonl"])
    held = lambda f: sorted(r["id"] for s in ("train.jsonl", "test.jsonl", "eval.jsonl") for r in f[s]  # noqa: E731
                            if r["provenance"] == "original")
    assert held(mem) == held(st)
    assert m1["labels"] == m2["labels"] and set(m1) == set(m2)
    c = m2["counts"]
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    assert abs(c["test"] / c["kept"] - 0.1) < 0.01 and abs(c["eval"] / c["kept"] - 0.05) < 0.01
    for lab, n in Counter(r["label"] for r in st["test.jsonl"]).items():  # stratified while streaming
        total = sum(1 for s in ("train.jsonl", "test.jsonl", "eval.jsonl") for r in st[s]
                    if r["label"] == lab and r["provenance"] == "original")
        assert abs(n - round(total * 0.1)) <= 1
    assert c["derived"] == c["train"] and st["report"]["streaming"] is True


def test_streaming_balance_augment_accounting(tmp_path, medical_csv):
    m, st = _run(tmp_path, "s", path=str(medical_csv), streaming=True, balance={"method": "cap_floor", "cap": 400, "floor": 60},
                 augment={"methods": ["synonym"], "ratio": 0.1})
    c = m["counts"]
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    assert len(st["rejected.jsonl"]) + len(st["duplicates.jsonl"]) == sum(c["dropped"].values())
    train = [r for r in st["train.jsonl"] if r["provenance"] != "derived:label_task"]
    per = Counter(r["label"] for r in train if r["provenance"] in ("original", "oversampled"))
    assert max(per.values()) <= 400 and min(per.values()) >= 60
    assert any(r["provenance"] == "augmented:synonym" for r in train)
    assert all(r["provenance"] == "original" for s in ("test.jsonl", "eval.jsonl") for r in st[s])
    assert c["train"] == len(train) and st["report"]["balance"]["after"] == dict(sorted(per.items()))
