"""dsft data distill with a real teacher: a tiny DeepSeek-V3 served by `dsft serve` (real uvicorn on loopback),
driven through the CLI; real usage counts, the samples written, the accounting and the mix."""

from __future__ import annotations

import json

import pytest

from dsft.cli import main
from dsft.config import ServeConfig
from dsft.data.distill.store import load
from dsft.model.tiny import build_tiny_deepseek_v3
from dsft.run import read_jsonl


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dsft.serve import serve_in_background

    model = build_tiny_deepseek_v3(tmp_path_factory.mktemp("distill-teacher") / "tiny-ds3", seed=0)
    with serve_in_background(str(model), ServeConfig(port=0, served_model_name="tiny-teacher", max_batch_size=8)) as url:
        yield url


def test_dsft_serve_as_the_teacher(served, tmp_path, medical_csv, capsys):
    cfg = {"run_dir": str(tmp_path / "run"), "distill": {
        "input": str(medical_csv), "max_prompts": 3, "samples_per_prompt": 2,
        "teacher": {"base_url": f"{served}/v1", "model": "tiny-teacher", "max_tokens": 12, "temperature": 1.0,
                    "seed": 7, "concurrency": 4,
                    "extra_body": {"stop": ["的", "，", "。"]}},  # the random model rarely ends on its own
        # a random-init model neither thinks nor answers in sentences: check the plumbing, not the quality
        "verify": {"rewards": [], "require_reasoning": False, "language": "off", "max_repetition": None},
        "mix": {"non_reasoning": str(medical_csv), "reasoning_share": 0.5}}}
    path = tmp_path / "distill.yaml"
    path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    assert main(["data", "distill", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "distill: 3 of 3 prompts sampled (0 pending)" in printed and "mix:" in printed
    out = tmp_path / "run" / "distill"
    rows = load(out / "samples.jsonl").rows
    assert len(rows) == 3 and all(len(r["samples"]) == 2 for r in rows)
    for r in rows:
        for s in r["samples"]:
            assert s["usage"]["prompt_tokens"] > 5 and 0 < s["usage"]["completion_tokens"] <= 12  # the server's counts
            assert s["finish_reason"] in ("stop", "length") and s["error"] is None
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["samples"] == 6 == c["kept"] + sum(c["dropped"].values())
    assert set(c["dropped"]) <= {"truncated", "empty_answer", "near_duplicate", "answer_too_short"}
    assert m["budget"]["tokens"] == sum(s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"]
                                        for r in rows for s in r["samples"])
    mixed = read_jsonl(out / "mixed.jsonl")
    assert c["kept"] >= 1, c  # the stop strings end most samples
    assert sum(not r["think"] for r in mixed) == m["mix"]["non_reasoning"] == c["kept"]  # share 0.5
    assert all(r["messages"][-1]["content"].startswith("<think>\n\n</think>\n\n") for r in mixed if not r["think"])
    # a second run sends nothing: every prompt is done
    assert main(["data", "distill", str(path)]) == 0
    assert "3 of 3 prompts sampled" in capsys.readouterr().out and load(out / "samples.jsonl").rows == rows
