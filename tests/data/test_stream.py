"""One pipeline, two drivers: `data.streaming: true` (work files) writes the same bytes as the in-memory driver."""

from __future__ import annotations

import hashlib
import json

from dsft.config import config_from_dict
from dsft.data.stage import run as prepare
from dsft.data.store import FileStore, MemoryStore
from dsft.run import RunDir

OUTPUTS = ("train.jsonl", "test.jsonl", "eval.jsonl", "rejected.jsonl", "duplicates.jsonl", "manifest.json")
# the packaged subset through the default cleaning (the demo's data stage), as the pre-refactor code wrote it
DEMO_SHA256 = {
    "train.jsonl": "d71f27a389748ad7425fea5e51666e73185370c12fa45b3a385dec143780922e",
    "test.jsonl": "9e9a3bdeb7d05ca6fffd7a7cab71ed2dbe03975db5c4b7913f3e45b995c58a59",
    "eval.jsonl": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "rejected.jsonl": "85961646d43c3cb94d639a3ed0d0e64279cb541d8358c5f01b199f92cbaf1bb6",
    "duplicates.jsonl": "984690dc3ba3763d3bba2f1fb6de56c1c42ac4bc81450c8b5ebbe2e0bfd3a4c6",
}


def _run(tmp_path, name: str, **data) -> tuple[dict, dict[str, bytes], dict]:
    cfg = config_from_dict({"run_dir": str(tmp_path / name), "data": {"report_plots": False, **data}})
    m = prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    assert not (d / ".work").exists()  # the streaming driver's work files are gone
    report = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    report.pop("timings_s")
    report.pop("streaming", None)
    return m, {f: (d / f).read_bytes() for f in OUTPUTS}, report


def test_demo_outputs_unchanged_by_either_driver(tmp_path):
    for streaming in (False, True):
        m, files, _ = _run(tmp_path, f"s{streaming}", eval_size=0.0, streaming=streaming, batch_size=300)
        assert {f: hashlib.sha256(files[f]).hexdigest() for f in DEMO_SHA256} == DEMO_SHA256, streaming
        c = m["counts"]
        assert (c["input"], c["kept"], c["dropped"]) == (1667, 1627, {"char_repetition": 3, "duplicate_exact": 33,
                                                                      "near_duplicate": 4})


def test_both_drivers_write_the_same_bytes_with_every_step_on(tmp_path):
    """Sampling, PII masking, token limits, exact + near dedup, decontamination, eval split, oversampling and
    synonym augmentation on the packaged subset; small batches so the streaming driver works in many chunks."""
    ev = tmp_path / "bench.jsonl"
    ev.write_text(json.dumps({"question": "头痛", "answer": "建议您到正规医院神经内科就诊，做头颅CT检查，明确病因后对症治疗。"},
                             ensure_ascii=False) + "\n", encoding="utf-8")
    data = {"max_samples": 1500, "eval_size": 0.1, "batch_size": 64, "near_dedup": {"threshold": 0.7},
            "quality": {"pii": "mask", "max_tokens": {"conversation": 400}, "decontaminate": [str(ev)], "decontam_ngram": 8},
            "balance": {"method": "cap_floor", "cap": 150, "floor": 60}, "augment": {"methods": ["synonym"], "ratio": 0.2}}
    m1, mem, rep1 = _run(tmp_path, "mem", **data)
    m2, stream, rep2 = _run(tmp_path, "stream", streaming=True, **data)
    for f in OUTPUTS:
        assert mem[f] == stream[f], f
    assert rep1 == rep2 and m1 == m2
    c = m1["counts"]
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    for reason in ("max_samples", "duplicate_exact", "near_duplicate", "balance_undersampled", "contaminated"):
        assert c["dropped"].get(reason, 0) > 0, reason
    assert rep1["augment"]["made"]["synonym"] > 0 and rep1["balance"]["oversampled"] > 0


def test_file_store_reads_back_what_it_holds(tmp_path):
    recs = [{"id": str(i), "text": "头痛" * (i % 5), "n": i, "x": None} for i in range(50)]
    mem, w = MemoryStore(), FileStore(tmp_path).writer()
    for r in recs:
        mem.add(r)
        w.add(r)
    fs = w.finish()
    for store in (mem, fs):
        assert len(store) == 50 and [r for _, c in store.chunks(3) for r in c] == recs
        assert [s for s, _ in store.chunks(3)] == [0, 24, 48]  # chunks of batch_size × CHUNK_BATCHES records
        sub = store.select([1, 7, 49])
        assert sub.get([2, 0, 0]) == [recs[49], recs[1], recs[1]] and len(sub) == 3
