"""dsft data distill against a fake teacher on loopback (a real HTTP server): retries on 429/500 honouring
Retry-After, retries running out, the token budget, bounded concurrency, the API key from the environment."""

from __future__ import annotations

import json

import pytest
from distill_fake_teacher import FakeTeacher, chat

from dsft.config import config_from_dict
from dsft.data.distill.main import run_distill
from dsft.data.distill.store import load
from dsft.data.distill.teacher import TeacherError
from dsft.errors import ConfigError
from dsft.run import RunDir


def prompts_file(tmp_path, n: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{i + 3}加{i + 4}等于多少？", "answer": str(2 * i + 7)},
                                    ensure_ascii=False) + "\n" for i in range(n)), encoding="utf-8")
    return p


def right(prompt: str) -> dict:
    a, b = prompt.split("等于")[0].split("加")
    return chat(f"答案是\\boxed{{{int(a) + int(b)}}}", reasoning=f"{a}加{b}，逐位相加得到{int(a) + int(b)}。")


def config(tmp_path, url: str, n_prompts: int = 4, **distill):
    teacher = {"base_url": url, "model": "fake", "seed": 0, "backoff_s": 0.05, **distill.pop("teacher", {})}
    d = {"input": str(prompts_file(tmp_path, n_prompts)), "format": "rl", "samples_per_prompt": 1,
         "teacher": teacher, **distill}
    return config_from_dict({"run_dir": str(tmp_path / "run"), "distill": d})


def run(cfg, **kw):
    return run_distill(cfg, RunDir(cfg.run_dir), **kw)


def test_429_and_500_are_retried_and_retry_after_is_honoured(tmp_path):
    def script(prompt, k, attempt):
        if attempt == 0:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down", "type": "rate_limit"}}
        if attempt == 1:
            return 500, {}, {"error": {"message": "boom"}}
        return 200, {}, right(prompt)

    with FakeTeacher(script) as t:
        m = run(config(tmp_path, t.url, n_prompts=2, teacher={"concurrency": 2}))
    assert m["complete"] and m["counts"]["kept"] == 2
    rep = json.loads((tmp_path / "run/distill/distill_report.json").read_text())
    sess = rep["sampling"]["session"]
    assert sess["requests"] == 6 and sess["retries"] == 4 and sess["retry_causes"] == {"429": 2, "500": 2}
    for prompt in {p for _, p, *_ in t.log}:
        times = sorted((a, t0) for t0, p, _, a, _ in t.log if p == prompt)
        assert times[1][1] - times[0][1] >= 0.95  # Retry-After: 1 waited, not the 0.05 s backoff
        assert times[2][1] - times[1][1] < 0.9  # the 500 had no Retry-After: exponential backoff from 0.05 s


def test_retries_running_out_leave_the_prompt_pending_and_a_rerun_finishes(tmp_path):
    state = {"down": True}

    def script(prompt, k, attempt):
        if state["down"] and prompt.startswith("5加"):
            return 503, {}, {"error": {"message": "overloaded"}}
        return 200, {}, right(prompt)

    with FakeTeacher(script) as t:
        cfg = config(tmp_path, t.url, n_prompts=5, teacher={"concurrency": 1, "max_retries": 2})
        m = run(cfg)
        assert not m["complete"] and m["failed"] == 1 and "kept failing" in m["stopped"]
        # in flight: one prompt beyond the request slots (the 4th, started while the 3rd retried); none after that
        assert m["done"] == 3 and m["pending"] == 2
        assert not any(p.startswith("7加") for _, p, *_ in t.log)
        assert sum(1 for *_, s in t.log if s == 503) == 3  # 1 + max_retries
        first = {p for _, p, *_ in t.log if not p.startswith("5加")}
        state["down"] = False
        mark = t.log[-1][0]
        m2 = run(cfg)
        again = {p for t0, p, *_ in t.log if t0 > mark}
    assert m2["complete"] and m2["counts"]["samples"] == 5 and m2["counts"]["kept"] == 5
    assert not (again & first), "a prompt written in the first run was sampled again"
    ids = [r["prompt_id"] for r in load(tmp_path / "run/distill/samples.jsonl").rows]
    assert len(ids) == len(set(ids)) == 5


def test_token_budget_stops_cleanly_and_holds_across_runs(tmp_path):
    with FakeTeacher(lambda p, k, a: (200, {}, right(p))) as t:
        cfg = config(tmp_path, t.url, n_prompts=8, samples_per_prompt=2,
                     teacher={"concurrency": 1}, budget={"max_tokens": 100})
        m = run(cfg)
        spent = m["budget"]["tokens"]
        assert not m["complete"] and "token budget spent" in m["stopped"]
        assert spent == m["done"] * 2 * 30 and spent >= 100  # usage 10 + 20 per sample, counted from the teacher
        assert m["done"] <= 100 // 60 + 2  # prompts already started when the budget ran out still finish
        n_requests = len(t.log)
        assert run(cfg)["done"] == m["done"] and len(t.log) == n_requests  # spent stays spent after a restart
        bigger = config_from_dict({**cfg.model_dump(exclude={"resolution"}),
                                   "distill": {**cfg.distill.model_dump(), "budget": {"max_tokens": 10_000}}})
        m3 = run(bigger)
    assert m3["complete"] and m3["budget"]["tokens"] == 8 * 60 and len(t.log) == 16


def test_cost_budget(tmp_path):
    with FakeTeacher(lambda p, k, a: (200, {}, right(p))) as t:
        m = run(config(tmp_path, t.url, n_prompts=6, teacher={"concurrency": 1},
                       budget={"max_cost": 0.00005, "input_price_per_million": 1.0, "output_price_per_million": 2.0}))
    assert "cost budget spent" in m["stopped"] and m["budget"]["cost"] == pytest.approx(m["done"] * 50e-6)


def test_concurrency_is_bounded(tmp_path):
    with FakeTeacher(lambda p, k, a: (200, {}, right(p)), delay_s=0.15) as t:
        m = run(config(tmp_path, t.url, n_prompts=6, samples_per_prompt=2, teacher={"concurrency": 3}))
    assert m["complete"] and m["counts"]["samples"] == 12
    assert 2 <= t.max_in_flight <= 3


def test_api_key_comes_from_the_environment_and_is_never_written(tmp_path, monkeypatch):
    key = "sk-test-1234567890"
    with FakeTeacher(lambda p, k, a: (200, {}, right(p))) as t:
        cfg = config(tmp_path, t.url, n_prompts=2, teacher={"api_key_env": "DSFT_TEST_TEACHER_KEY"})
        with pytest.raises(ConfigError, match="DSFT_TEST_TEACHER_KEY is not set"):
            run(cfg)
        monkeypatch.setenv("DSFT_TEST_TEACHER_KEY", key)
        assert run(cfg)["complete"]
    assert set(t.auth) == {f"Bearer {key}"}
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"distill": {"teacher": {"api_key": key}}})


def test_401_stops_the_run_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFT_TEST_TEACHER_KEY", "wrong")
    with FakeTeacher(lambda p, k, a: (401, {}, {"error": {"message": "Authentication Fails"}})) as t:
        with pytest.raises(TeacherError, match=r"401 Authentication Fails — check the key in \$DSFT_TEST_TEACHER_KEY"):
            run(config(tmp_path, t.url, teacher={"api_key_env": "DSFT_TEST_TEACHER_KEY"}))
    rep = json.loads((tmp_path / "run/distill/distill_report.json").read_text())
    assert rep["sampling"]["done"] == 0 and rep["sampling"]["pending"] == 4  # reported before the error


def test_a_400_on_the_first_request_is_fatal_later_it_drops_the_sample(tmp_path):
    with FakeTeacher(lambda p, k, a: (400, {}, {"error": {"message": "bad top_k"}})) as t:
        with pytest.raises(TeacherError, match="first request was refused.*bad top_k"):
            run(config(tmp_path, t.url, teacher={"concurrency": 1}))

    def script(prompt, k, attempt):
        if prompt.startswith("4加"):
            return 400, {}, {"error": {"message": "prompt too long"}}
        return 200, {}, right(prompt)

    with FakeTeacher(script) as t:
        m = run(config(tmp_path / "b", t.url, teacher={"concurrency": 1}))
    assert m["complete"] and m["counts"]["dropped"] == {"teacher_error": 1} and m["counts"]["kept"] == 3


def test_the_example_reads_its_key_from_deepseek_api_key(tmp_path, monkeypatch, capsys, medical_csv):
    from pathlib import Path

    from dsft.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "distill_r1_medical.yaml"
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    rc = main(["data", "distill", str(example), "--run-dir", str(tmp_path / "run"),
               "--set", f"distill.input={medical_csv}", "--set", f"distill.mix.non_reasoning={medical_csv}",
               "--set", "distill.max_prompts=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == ("dsft: error: distill.teacher.api_key_env: the environment variable "
                                   "DEEPSEEK_API_KEY is not set (export DEEPSEEK_API_KEY=... before running)")
