"""Engines: the local worker pool and Ray Data run the same batch steps and give byte-identical outputs."""

from __future__ import annotations

import pytest

from dsft.config import config_from_dict
from dsft.data.engine import LocalEngine
from dsft.data.minhash import ShingleBatch, concat_shingles, shingle
from dsft.data.quality import QualityFilter
from dsft.data.stage import run as prepare
from dsft.run import RunDir

OUTPUTS = ("train.jsonl", "test.jsonl", "eval.jsonl", "rejected.jsonl", "duplicates.jsonl")


def _texts(n: int = 3000) -> list[str]:
    base = ["头痛三天了，建议多休息，多喝水。", "胃痛饭后加重，少食多餐。", "The fever lasted three days, see a doctor."]
    return [f"{base[i % 3]}第{i}例" for i in range(n)]


def test_local_pool_equals_inline():
    texts = _texts()
    pooled = LocalEngine(workers=2, min_parallel=0).map_batches(ShingleBatch(), texts, 700)
    inline = LocalEngine(workers=1).map_batches(ShingleBatch(), texts, 700)
    whole = shingle(texts)
    for a, b, c in zip(concat_shingles(pooled), concat_shingles(inline), whole, strict=True):
        assert (a == b).all() and (a == c).all()
    q = {"min_chars": {"answer": 2}, "pii": "mask", "drop_refusals": True, "max_char_repetition": 0.5}
    recs = [{"id": str(i), "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t}],
             "fields": {"question": t, "answer": t}} for i, t in enumerate(texts[:600])]
    assert LocalEngine(2, min_parallel=0).map_batches(QualityFilter(q), recs, 100) == [QualityFilter(q)(recs[i:i + 100])
                                                                                        for i in range(0, 600, 100)]


def _prepare(tmp_path, name: str, **data) -> dict[str, bytes]:
    cfg = config_from_dict({"run_dir": str(tmp_path / name), "data": {
        "batch_size": 400, "eval_size": 0.05, "quality": {"require_terminal_punctuation": True},
        "augment": {"methods": ["synonym"], "ratio": 0.2}, **data}})
    prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    return {f: (d / f).read_bytes() for f in OUTPUTS}


def test_ray_engine_is_byte_identical(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'dsft[ray]'); the local engine needs no Ray")
    pytest.importorskip("ray.data", reason="ray is installed without ray[data]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        on_ray = _prepare(tmp_path, "ray", engine="ray")
    finally:
        ray.shutdown()
    local = _prepare(tmp_path, "local", engine="local")
    assert local["train.jsonl"] and local["duplicates.jsonl"]
    for f in OUTPUTS:
        assert on_ray[f] == local[f], f
