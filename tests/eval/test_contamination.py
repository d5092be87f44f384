"""Contamination check: n-gram overlap between eval and train items, pairs listed."""

from __future__ import annotations

from eval_helpers import real_records

from dsft.eval.contamination import check, ngrams


def test_flags_copied_items_and_lists_pairs():
    train = real_records(40)
    test = real_records(10, start=200)
    leaked = dict(test[3], id="leak")
    train.append({**leaked, "id": "train-copy"})  # an eval item that is also a training item
    near = dict(train[5], id="near")  # a training item with a few characters changed
    near["messages"] = [dict(m, content=m["content"].replace("的", "得")) for m in near["messages"]]
    res = check([*test, near], train, n=8, threshold=0.5, lang="zh")
    ids = {(p["eval_id"], p["train_id"]) for p in res["pairs"]}
    assert (test[3]["id"], "train-copy") in ids
    assert ("near", train[5]["id"]) in ids
    assert res["checked"] == 11 and res["flagged"] == len(res["pairs"]) == 2
    assert res["pairs"][0]["overlap"] == 1.0 and 0.5 <= res["pairs"][1]["overlap"] < 1.0


def test_clean_split_is_not_flagged():
    res = check(real_records(10, start=300), real_records(60), n=8, threshold=0.5)
    assert res["lang"] == "zh" and res["flagged"] == 0 and res["pairs"] == []


def test_english_word_ngrams():
    assert ngrams("The cat sat on the mat", 3, "en") == {("the", "cat", "sat"), ("cat", "sat", "on"), ("sat", "on", "the"), ("on", "the", "mat")}
    ev = [{"id": "e", "messages": [{"role": "user", "content": "the patient has a fever and a headache since monday"}]}]
    tr = [{"id": "t", "messages": [{"role": "user", "content": "Patient has a fever and a headache since Monday!"}]}]
    res = check(ev, tr, n=3, threshold=0.5)
    assert res["lang"] == "en" and res["pairs"][0]["train_id"] == "t"
