"""Resume of dsft data distill: a CLI run killed mid-way (SIGKILL) resumes without sampling a written prompt again
and without losing one; a torn last line is cut off; changed settings or prompts are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from distill_fake_teacher import FakeTeacher, chat

from dsft.config import config_from_dict
from dsft.data.distill.main import run_distill
from dsft.data.distill.store import load
from dsft.errors import ConfigError
from dsft.run import RunDir


def reply(prompt, k, attempt):
    n = int(prompt.split("号")[0])
    return 200, {}, chat(f"答案是\\boxed{{{n * 2}}}", reasoning=f"第{n}题：把{n}乘以二，得到{n * 2}。")


def write_input(tmp_path, n=20):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{i}号题：{i}的两倍是多少？", "answer": str(2 * i)}, ensure_ascii=False)
                         + "\n" for i in range(n)), encoding="utf-8")
    return p


def cfg_dict(tmp_path, url, **distill):
    return {"run_dir": str(tmp_path / "run"), "distill": {
        "input": str(write_input(tmp_path)), "format": "rl", "samples_per_prompt": 2,
        "teacher": {"base_url": url, "seed": 0, "concurrency": 2}, **distill}}


def test_a_killed_run_resumes_without_duplicates_or_losses(tmp_path):
    samples = tmp_path / "run" / "distill" / "samples.jsonl"
    with FakeTeacher(reply, delay_s=0.15) as t:
        cfg_file = tmp_path / "distill.yaml"
        cfg_file.write_text(json.dumps(cfg_dict(tmp_path, t.url)), encoding="utf-8")  # JSON is YAML
        proc = subprocess.Popen([sys.executable, "-m", "dsft", "data", "distill", str(cfg_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 120
        while not (samples.exists() and samples.read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no prompt written within 120 s"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        before = set(load(samples).ids)
        assert 4 <= len(before) < 20, "kill came too late to test a resume"
        mark = time.monotonic()
        t.delay_s = 0.0
        cfg = config_from_dict(cfg_dict(tmp_path, t.url))
        m = run_distill(cfg, RunDir(cfg.run_dir))
        again = {int(p.split("号")[0]) for t0, p, *_ in t.log if t0 > mark}
    rows = load(samples).rows
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 20 and m["complete"], "a prompt was lost or written twice"
    assert all(len(r["samples"]) == 2 for r in rows)
    done_before = {int(i.rsplit(":", 1)[1]) - 1 for i in before}
    assert not (again & done_before), f"prompts {sorted(again & done_before)} were sampled again after the resume"
    assert again == set(range(20)) - done_before
    # the fake answers both samples of a prompt alike: the second is a near-duplicate trace
    assert m["counts"] == {"samples": 40, "kept": 20, "dropped": {"near_duplicate": 20}}


def test_a_torn_last_line_is_cut_and_its_prompt_sampled_again(tmp_path):
    with FakeTeacher(reply) as t:
        cfg = config_from_dict(cfg_dict(tmp_path, t.url, max_prompts=5))
        run_distill(cfg, RunDir(cfg.run_dir))
        samples = tmp_path / "run/distill/samples.jsonl"
        lines = samples.read_bytes().splitlines(keepends=True)
        samples.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # a crash in the middle of the last write
        lost = json.loads(lines[-1])["prompt_id"]
        n = len(t.log)
        m = run_distill(cfg, RunDir(cfg.run_dir))
        assert len(t.log) == n + 2 and m["complete"]  # only the torn prompt's 2 samples again
    rep = json.loads((tmp_path / "run/distill/distill_report.json").read_text())
    assert rep["sampling"]["torn_bytes_cut"] == 40
    assert sorted(r["prompt_id"] for r in load(samples).rows) == sorted({*load(samples).ids}) and lost in load(samples).ids


def test_changed_settings_or_prompts_are_refused_and_force_starts_over(tmp_path):
    with FakeTeacher(reply) as t:
        cfg = config_from_dict(cfg_dict(tmp_path, t.url, max_prompts=3))
        run_distill(cfg, RunDir(cfg.run_dir))
        other = config_from_dict(cfg_dict(tmp_path, t.url, max_prompts=3, samples_per_prompt=4))
        with pytest.raises(ConfigError, match=r"samples_per_prompt changed .* \(was 2, now 4\).*--force"):
            run_distill(other, RunDir(other.run_dir))
        templ = config_from_dict(cfg_dict(tmp_path, t.url, max_prompts=3, prompt_template="{prompt} 请写出过程。"))
        with pytest.raises(ConfigError, match="prompt_template changed"):
            run_distill(templ, RunDir(templ.run_dir))
        m = run_distill(other, RunDir(other.run_dir), force=True)
        q = tmp_path / "q.jsonl"
        q.write_text(q.read_text(encoding="utf-8").replace("0号题：0的两倍", "0号题：0的三倍"), encoding="utf-8")
        edited = other.model_copy(deep=True)
        edited.distill.input = str(q)  # config_from_dict would rewrite the file from scratch
        with pytest.raises(ConfigError, match="q.jsonl:1' was sampled with other text"):
            run_distill(edited, RunDir(edited.run_dir))
    assert m["counts"]["samples"] == 12 and len(load(tmp_path / "run/distill/samples.jsonl").rows) == 3


def test_a_corrupt_line_before_the_last_is_one_clear_error(tmp_path):
    from dsft.errors import DataError

    out = tmp_path / "samples.jsonl"
    out.write_text('{"prompt_id": "a", "prompt_sha": "x", "samples": []}\nnot json\n'
                   '{"prompt_id": "b", "prompt_sha": "y", "samples": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"samples.jsonl:2: not a samples row"):
        load(out)
