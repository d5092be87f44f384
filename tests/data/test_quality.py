"""Quality filters, PII masking, decontamination, balancing and splits — hand-built records and real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dsft.config import config_from_dict
from dsft.data.balance import balance, target_counts
from dsft.data.quality import QualityFilter, char_repetition_ratio, mask_pii, special_char_ratio
from dsft.data.split import shuffle_buffer, stratified_split, stream_split, stream_split_file
from dsft.data.stage import run as prepare
from dsft.run import RunDir, read_jsonl

Q = {"min_chars": {"answer": 2}, "max_chars": {}, "min_tokens": {}, "max_tokens": {}, "min_answer_question_ratio": None,
     "max_answer_question_ratio": None, "max_char_repetition": 0.5, "max_special_char_ratio": 0.4,
     "require_terminal_punctuation": True, "drop_refusals": True, "extra_patterns": [r"以上意见仅供参考"], "pii": "mask"}


def rec(answer: str, question: str = "头痛三天了怎么办？", label: str | None = "神经科", i: int = 0) -> dict:
    return {"id": f"t:{i}", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "fields": {"question": question, "answer": answer}, "label": label, "domain": label,
            "source": {"file": "t", "line": i}, "provenance": "original"}


@pytest.mark.parametrize(("answer", "reason"), [
    ("好", "too_short:answer"),
    ("多喝水多休息。" * 8, "char_repetition"),
    ("★★★☆☆♥♥♥♥ 好的。", "special_chars"),
    ("建议多休息，必要时到医院神经科就诊", "incomplete_answer"),
    ("作为一个AI语言模型，我不能给出医疗建议。", "refusal"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("建议多休息。以上意见仅供参考。", "boilerplate"),
    ("建议多休息，必要时到医院神经科就诊。", None),
])
def test_each_filter(answer, reason):
    _, got, detail, _ = QualityFilter(Q).check(rec(answer))
    assert got == reason, detail


def test_pii_masked_or_dropped():
    text = "请联系 13812345678 或 zhang.san@example.com，身份证 11010519491231002X，座机 010-12345678。"
    masked, found = mask_pii(text)
    assert masked == "请联系 [PHONE] 或 [EMAIL]，身份证 [ID]，座机 [PHONE]。"
    assert found == Counter({"PHONE": 2, "EMAIL": 1, "ID": 1})
    assert mask_pii("血压 140/90，血糖 8.5mmol/L，2023年10月")[1] == Counter()  # numbers are not PII
    new, reason, _, pii = QualityFilter(Q).check(rec("请拨打13812345678预约。"))
    assert reason is None and new["messages"][1]["content"] == "请拨打[PHONE]预约。" and new["fields"]["answer"] == "请拨打[PHONE]预约。"
    assert QualityFilter({**Q, "pii": "drop"}).check(rec("请拨打13812345678预约。"))[1] == "pii"


def test_ratios():
    assert char_repetition_ratio("好的" * 50) == 1.0 and char_repetition_ratio("头痛怎么办，医生说多休息。") == 0.0
    assert special_char_ratio("你好，世界。") == 0.0 and special_char_ratio("★★") == 1.0


def test_balance_cap_floor_temperature_deterministic():
    train = [rec("答。", label="A", i=i) for i in range(40)] + [rec("答。", label="B", i=100 + i) for i in range(4)]
    out, under, info = balance(train, "cap", cap=10, seed=1)
    assert Counter(r["label"] for r in out) == {"A": 10, "B": 4} and len(under) == 30
    assert [r["id"] for r in balance(train, "cap", cap=10, seed=1)[0]] == [r["id"] for r in out]
    assert [r["id"] for r in balance(train, "cap", cap=10, seed=2)[0]] != [r["id"] for r in out]
    out, under, info = balance(train, "floor", floor=10, seed=1)
    assert Counter(r["label"] for r in out) == {"A": 40, "B": 10} and not under
    assert sum(r["provenance"] == "oversampled" for r in out) == 6 and len({r["id"] for r in out}) == len(out)
    out, under, info = balance(train, "temperature", temperature=0.5, seed=1)
    assert len(out) == len(train) and Counter(r["label"] for r in out) == {"A": 33, "B": 11} and len(under) == 7
    t = target_counts({"A": 900, "B": 100}, "temperature", None, None, 0.5)
    assert sum(t.values()) == 1000 and t["A"] == 750 and t["B"] == 250  # 30:10 → 3:1


def test_stratified_and_streaming_split():
    recs = [rec("答。", label="AB"[i % 5 == 0], i=i) for i in range(1000)]
    tr, te, ev = stratified_split(recs, 0.1, 0.1, seed=3)
    assert len(te) == 100 and len(ev) == 100 and Counter(r["label"] for r in te) == {"A": 80, "B": 20}
    parts: dict[str, list] = {"train": [], "test": [], "eval": []}
    for s, r in stream_split(iter(recs), 0.1, 0.1, seed=3, buffer=64):
        parts[s].append(r)
    assert {k: len(v) for k, v in parts.items()} == {"train": 800, "test": 100, "eval": 100}
    assert Counter(r["label"] for r in parts["test"]) == {"A": 80, "B": 20}
    order = [r["id"] for r in shuffle_buffer(iter(recs), 64, seed=3)]
    assert sorted(order) == sorted(r["id"] for r in recs) and order != [r["id"] for r in recs]
    assert order == [r["id"] for r in shuffle_buffer(iter(recs), 64, seed=3)]


def test_stream_split_file(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(rec("答。", label="AB"[i % 2], i=i)) + "\n" for i in range(200)), encoding="utf-8")
    counts = stream_split_file(src, tmp_path / "out", 0.2, 0.0, seed=1, buffer=16)
    assert counts == {"train": 160, "test": 40, "eval": 0}
    assert len(read_jsonl(tmp_path / "out" / "test.jsonl")) == 40


def test_prepare_filters_balance_decontaminate_accounting(tmp_path, medical_csv):
    # the eval set: 30 real answers copied verbatim from the data; they must be removed from training
    import csv
    import io

    rows = list(csv.reader(io.StringIO(medical_csv.read_bytes().decode("gb18030"))))[1:]
    ev = tmp_path / "bench.jsonl"
    ev.write_text("".join(json.dumps({"question": r[1], "answer": r[3]}, ensure_ascii=False) + "\n" for r in rows[1000:1030]),
                  encoding="utf-8")
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "data": {
        "path": str(medical_csv), "max_samples": 3000, "eval_size": 0.05,
        "quality": {"require_terminal_punctuation": True, "decontaminate": [str(ev)]},
        "balance": {"method": "cap", "cap": 300}}})
    run = RunDir(cfg.run_dir)
    m = prepare(cfg, run)
    c = m["counts"]
    d = run.root / "data"
    rejected, dups = read_jsonl(d / "rejected.jsonl"), read_jsonl(d / "duplicates.jsonl")
    assert c["input"] == 7644 == c["kept"] + sum(c["dropped"].values())
    assert len(rejected) + len(dups) == sum(c["dropped"].values())  # every drop is listed with its reason
    assert Counter(r["reason"] for r in rejected) + Counter("duplicate_exact" if x["method"] == "exact" else "near_duplicate"
                                                            for x in dups) == Counter(c["dropped"])
    assert c["dropped"]["incomplete_answer"] > 0 and c["dropped"]["balance_undersampled"] > 0
    sampled = {r["line"] for r in rejected if r["reason"] == "max_samples"}
    leaked = {1002 + k for k in range(30)} - sampled  # lines (header = 1) of the eval rows that were sampled in
    assert c["dropped"].get("contaminated", 0) >= len(leaked) - 5
    train = [r for r in read_jsonl(d / "train.jsonl") if r["provenance"] == "original"]
    assert max(Counter(r["label"] for r in train).values()) <= 300
    rep = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    assert rep["balance"]["before"]["肝病科"] > 300 and rep["balance"]["after"]["肝病科"] == 300
    md = (d / "data_report.md").read_text(encoding="utf-8")
    assert "skew before → after" in md and "![labels before/after](labels.png)" in md and (d / "labels.png").stat().st_size > 5000
    assert (d / "lengths.png").exists() and rep["lengths_tokens"]["answer"]["count"] > 0
    assert Path(d / "eval.jsonl").read_text(encoding="utf-8").strip()
