"""MinHash + LSH near-dedup on hand-built pairs and the real medical answers; exact dedup; `dsft data dedup`."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from dsft.data.dedup import exact_dedup
from dsft.data.minhash import (
    ShingleBatch,
    concat_shingles,
    near_dedup,
    normalize_batch,
    optimal_bands,
    shingle,
)
from dsft.data.text import normalize

ROOT = Path(__file__).resolve().parents[2]
A = "糖尿病致使伤及生命的并发症，一般是糖尿病的急性并发症，或者是糖尿病慢性并发症的终末期。其中最常见的有低血糖，酮症酸中毒，高渗昏迷。"
B = A.replace("最常见", "最多见").replace("。", "！", 1)  # a few characters differ
C = "建议您到正规医院消化科做胃镜检查，明确是否有幽门螺杆菌感染，平时注意饮食清淡，少吃辛辣刺激的食物，戒烟戒酒。"


def _answers(path: Path, n: int) -> list[str]:
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("gb18030"))))[1:]
    return [r[3] for r in rows[:n]]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    sa = {a[i:i + n] for i in range(len(a) - n + 1)}
    sb = {b[i:i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_few_characters_apart_cluster_and_unrelated_do_not():
    res = near_dedup([C, A, B, "完全无关的一句话，讲的是今天天气很好，适合出门散步。"], threshold=0.7)
    assert res.keep.tolist() == [True, True, False, True]
    (d,) = res.duplicates
    assert d["index"] == 2 and d["duplicate_of"] == 1  # the lowest index of the cluster is kept
    assert d["jaccard"] == pytest.approx(_jaccard(normalize(A), normalize(B)), abs=1e-4) and d["jaccard"] >= 0.7


def test_lowest_index_kept_in_a_chain_and_deterministic():
    texts = [C, B, A, A + "谢谢。", C]
    r1, r2 = near_dedup(texts, threshold=0.7), near_dedup(list(texts), threshold=0.7)
    assert r1.keep.tolist() == r2.keep.tolist() == [True, True, False, False, False]
    assert {d["index"]: d["duplicate_of"] for d in r1.duplicates} == {2: 1, 3: 1, 4: 0}
    assert all("matched" not in d or d["matched_jaccard"] >= 0.7 for d in r1.duplicates)
    assert r1.duplicates == r2.duplicates


def test_english_uses_word_ngrams():
    a = "The patient should rest, drink plenty of water and see a doctor if the fever lasts more than three days."
    b = a.replace("plenty of", "lots of")
    c = "Take the tablets twice a day after meals and avoid alcohol during the whole course of treatment."
    res = near_dedup([a, b, c], threshold=0.5, word_ngram=2)
    assert res.keep.tolist() == [True, False, True]


def test_normalize_batch_matches_the_reference_normaliser():
    texts = [A, "Ｈｅｌｌｏ， ＷＯＲＬＤ！ 123", "ﬁne ㎏ ⑩", "", "😀头痛𠀀怎么办", C]
    cp, owner, lens = normalize_batch(texts)
    got = [cp[owner == i].tobytes().decode("utf-32-le") for i in range(len(texts))]
    # the reference: NFKC + lowercase + letters/digits only (character by character)
    ref = ["".join(c for c in unicodedata.normalize("NFKC", t).lower() if c.isalnum()) for t in texts]
    assert got == ref
    assert lens.tolist() == [len(x) for x in ref]


def test_batched_shingles_equal_one_call(medical_csv):
    texts = _answers(medical_csv, 600) + ["短", "", "Plain English text with several words in it"]
    one = shingle(texts)
    parts = concat_shingles([ShingleBatch()(texts[i:i + 97]) for i in range(0, len(texts), 97)])
    assert np.array_equal(one[0], parts[0]) and np.array_equal(one[1], parts[1])
    assert one[1][texts.index("")] == 0 and one[1][texts.index("短")] == 1


def test_bands_from_threshold():
    assert optimal_bands(0.8, 128) == (16, 8)
    b, r = optimal_bands(0.5, 128)
    assert b * r == 128 and b > 16


def test_real_answers_against_exact_jaccard(medical_csv):
    texts = _answers(medical_csv, 2500)
    res = near_dedup(texts, threshold=0.8, verify="exact")
    norm = [normalize(t) for t in texts]
    for d in res.duplicates:  # every reported pair really is that similar (and chained ones are listed honestly)
        assert d["duplicate_of"] < d["index"]
        assert d["jaccard"] == pytest.approx(_jaccard(norm[d["index"]], norm[d["duplicate_of"]]), abs=1e-4)
        if "matched" in d:
            assert d["matched_jaccard"] == pytest.approx(_jaccard(norm[d["index"]], norm[d["matched"]]), abs=1e-4)
            assert d["matched_jaccard"] >= 0.8
        else:
            assert d["jaccard"] >= 0.8
    exact = {i for i in range(len(texts)) if norm[i] in set(norm[:i])}
    assert exact <= {d["index"] for d in res.duplicates}
    assert len(res.duplicates) > len(exact)  # near (not only exact) duplicates are found in the real answers


def test_exact_dedup_normalises_case_width_space_punct():
    recs = [{"id": str(i), "fields": {"question": q, "answer": "OK"}, "messages": []}
            for i, q in enumerate(["头痛怎么办？", "头痛 怎么办?", "ＨＥＡＤ", "head!", "胃痛"])]
    kept, dups = exact_dedup(recs, ["question", "answer"])
    assert [r["id"] for r in kept] == ["0", "2", "4"]
    assert [(d["index"], d["duplicate_of"]) for d in dups] == [(1, 0), (3, 2)]


def test_cli_dedup(tmp_path, medical_csv):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "dsft", "data", "dedup", str(medical_csv), "-o", str(out), "--fields", "answer",
           "--threshold", "0.8", "--ngram", "5", "--num-perm", "128"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    dups = [json.loads(x) for x in (tmp_path / "k.duplicates.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = out.read_text(encoding="utf-8").splitlines()
    assert len(kept) + len(dups) == 7644 and len(dups) >= 400
    assert all(set(d) >= {"index", "duplicate_of", "jaccard"} for d in dups)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "--force" in r.stderr
