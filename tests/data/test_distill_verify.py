"""Verification, filters and the mix of dsft data distill: every sample kept or dropped with its reason
(samples = kept + Σ dropped), R1's think block and empty think block, the share of the mix, the report."""

from __future__ import annotations

import json

import pytest
from distill_fake_teacher import FakeTeacher, chat

from dsft.config import DataConfig, config_from_dict
from dsft.config.distill import MixConfig
from dsft.data.distill.filters import cjk_share, language_mismatch
from dsft.data.distill.main import run_distill
from dsft.data.distill.mix import EMPTY_THINK, counts_for_share, mix
from dsft.data.distill.teacher import split_think
from dsft.data.load import load_records
from dsft.run import RunDir, read_jsonl

QUESTIONS = [("小明有23个苹果，又买了6个，现在一共有多少个苹果？", "29"), ("每盒有2本书，买了20盒，一共有多少本？", "40"),
             ("16颗糖平均分给2个人，每人分到多少颗？", "8"), ("一本书有120页，已经看了45页，还剩多少页？", "75")]
GOOD = "先理解题意，题目给出了两个数量，需要把它们按题意进行运算，逐步计算，最后检查一遍结果是否合理。"
# sample k of every prompt: what the teacher answers and why verification must keep or drop it
CASES = {
    0: ("kept", lambda a: chat(f"所以答案是\\boxed{{{a}}}。", reasoning=GOOD + f"结果是{a}。")),
    1: ("kept", lambda a: chat(f"<think>\n按题意计算，得到{a}，再验算一遍，确认无误。\n</think>\n\n答案：\\boxed{{{a}}}")),
    2: ("wrong_answer", lambda a: chat("答案是\\boxed{1000}", reasoning=GOOD)),
    3: ("truncated", lambda a: chat("", reasoning=GOOD + "然后" * 5, finish="length")),
    4: ("language_mix", lambda a: chat(f"答案是\\boxed{{{a}}}", reasoning="First, read the problem carefully. "
                                       f"Then add or subtract the numbers step by step. The result is {a}.")),
    5: ("repetitive", lambda a: chat(f"答案是\\boxed{{{a}}}", reasoning="我们再算一遍这个数。" * 30)),
    6: ("no_reasoning", lambda a: chat(f"答案是\\boxed{{{a}}}")),
    7: ("near_duplicate", lambda a: chat(f"所以答案是\\boxed{{{a}}}。", reasoning=GOOD + f"结果是{a}。")),
    8: ("bad_format", lambda a: chat(f"<think>再想想</think>答案是\\boxed{{{a}}}", reasoning=GOOD)),
}


def script(prompt: str, k: int, attempt: int):
    answer = next(a for q, a in QUESTIONS if prompt.startswith(q))
    return 200, {}, CASES[k][1](answer)


@pytest.fixture
def distilled(tmp_path):
    qfile = tmp_path / "qa.jsonl"
    qfile.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n"
                             for q, a in QUESTIONS), encoding="utf-8")
    with FakeTeacher(script) as t:
        cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "distill": {
            "input": str(qfile), "samples_per_prompt": len(CASES), "teacher": {"base_url": t.url, "seed": 0},
            "mix": {"non_reasoning": "/work/shared/data/alpaca_zh_demo.json", "reasoning_share": 0.75}}})
        m = run_distill(cfg, RunDir(cfg.run_dir))
    return m, tmp_path / "run" / "distill"


def test_every_sample_is_kept_or_dropped_with_its_reason(distilled):
    m, out = distilled
    n = len(QUESTIONS)
    want = {}
    for reason, _ in CASES.values():
        want[reason] = want.get(reason, 0) + n
    kept = want.pop("kept")
    assert m["counts"] == {"samples": n * len(CASES), "kept": kept, "dropped": want}
    dropped = read_jsonl(out / "dropped.jsonl")
    assert len(dropped) == sum(want.values()) and all(d["reason"] and d["detail"] for d in dropped)
    for d in dropped:  # the sample each case sends is dropped for that case's reason, nothing else
        assert CASES[d["sample"]][0] == d["reason"], d
    dup = next(d for d in dropped if d["reason"] == "near_duplicate")
    assert "duplicate of" in dup["detail"] and dup["detail"].split()[2].endswith("#0")
    rep = json.loads((out / "distill_report.json").read_text())
    assert rep["verify"]["accounting_ok"] and rep["verify"]["prompts_with_kept"] == n
    assert (out / "distill.png").stat().st_size > 1000 and "adds up" in (out / "distill_report.html").read_text()


def test_kept_traces_are_r1_shaped_records(distilled):
    _, out = distilled
    rows = read_jsonl(out / "verified.jsonl")
    assert [r["source"]["sample"] for r in rows] == [0, 1] * len(QUESTIONS)  # input order, then sample order
    for r in rows:
        content = r["messages"][-1]["content"]
        assert content == f"<think>\n{r['reasoning']}\n</think>\n\n{r['fields']['answer']}"
        assert "<think>" not in r["fields"]["answer"] and r["think"] is True and r["reward"] == 1.0
        assert r["messages"][0] == {"role": "user", "content": r["fields"]["question"]}


def test_the_mix_has_the_stated_share_and_empty_think_blocks(distilled):
    m, out = distilled
    rows = read_jsonl(out / "mixed.jsonl")
    reasoning = [r for r in rows if r["think"]]
    plain = [r for r in rows if not r["think"]]
    assert len(reasoning) == 8 and len(plain) == round(8 / 3) == 3  # 0.75 share, nothing repeated
    assert m["mix"]["share_actual"] == pytest.approx(8 / 11, abs=1e-4)
    for r in plain:
        assert r["messages"][-1]["content"].startswith(EMPTY_THINK) and len(r["messages"][-1]["content"]) > len(EMPTY_THINK)
    # the training file goes through the data stage's readers unchanged (think blocks included)
    recs, rejected, _ = load_records(DataConfig(path=str(out / "mixed.jsonl")))
    assert not rejected and [r["messages"][-1]["content"] for r in recs] == [r["messages"][-1]["content"] for r in rows]


def test_no_sample_rereads_and_reverifies_without_the_teacher(distilled, tmp_path):
    m, out = distilled
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "distill": {
        "input": str(tmp_path / "qa.jsonl"), "samples_per_prompt": len(CASES),
        "teacher": {"base_url": "http://127.0.0.1:9/v1", "seed": 0}, "verify": {"max_per_prompt": 1}}})
    m2 = run_distill(cfg, RunDir(cfg.run_dir), sample=False)
    assert m2["counts"]["kept"] == len(QUESTIONS) and m2["counts"]["dropped"]["surplus_per_prompt"] == len(QUESTIONS)


def test_split_think():
    assert split_think("<think>\nabc\n</think>\n\nans") == ("abc", "ans", False)
    assert split_think("abc</think>ans") == ("abc", "ans", False)  # the template opened the block
    assert split_think("<think>never closed") == ("never closed", "", True)
    assert split_think("plain answer") == (None, "plain answer", False)


def test_language_filter():
    assert cjk_share("头痛怎么办") == 1.0 and cjk_share("1 + 2 = 3") is None
    assert cjk_share("答案是 \\frac{3}{4}，也就是 $x^2$") == 1.0  # LaTeX is not English
    assert language_mismatch("头痛怎么办？", "You should rest and drink water.", 0.5)
    assert language_mismatch("What is 2+2?", "答案是四", 0.5)
    assert language_mismatch("头痛怎么办？", "建议多休息，必要时服用 ibuprofen。", 0.5) is None


@pytest.mark.parametrize("n_r,n_n,share,strategy,want", [
    (100, 100, 0.75, "downsample", (100, 33)), (30, 100, 0.75, "downsample", (30, 10)),
    (300, 50, 0.75, "downsample", (150, 50)), (30, 100, 0.75, "upsample", (300, 100)),
    (300, 50, 0.75, "upsample", (300, 100)), (10, 0, 0.75, "downsample", (10, 0)), (10, 5, 1.0, "upsample", (10, 0)),
    (0, 50, 0.75, "downsample", (0, 0)), (0, 50, 0.75, "upsample", (0, 0)),
])
def test_counts_for_share(n_r, n_n, share, strategy, want):
    assert counts_for_share(n_r, n_n, share, strategy) == want


def test_upsample_repeats_the_smaller_side(tmp_path):
    rec = [{"id": f"r{i}", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "think": True} for i in range(3)]
    mixed, st = mix(rec, MixConfig(non_reasoning="/work/shared/data/alpaca_zh_demo.json", reasoning_share=0.5,
                                   strategy="upsample"))
    assert st["non_reasoning_available"] == 1000 and st["reasoning"] == 1000 and st["repeated"]["reasoning"] == 997
    assert len(mixed) == 2000 and sum(r["think"] for r in mixed) == 1000


def test_medical_triage_verified_by_label_with_contains_and_a_user_reward(tmp_path, monkeypatch, medical_csv):
    """The example's shape: real GB18030 medical questions, a prompt template asking for the department, the
    record's label as reference (`contains`), plus a user entry point `module:function` as a second verifier."""
    (tmp_path / "my_rewards.py").write_text(
        "def short_answer(completion, record, **args):\n"
        "    return float(len(completion.split('</think>')[-1].strip()) <= args['max_chars'])\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    recs, _, _ = load_records(DataConfig(path=str(medical_csv)))
    label_of = {r["messages"][0]["content"]: r["label"] for r in recs}

    def triage(prompt, k, attempt):
        label = label_of[prompt.split("\n请判断")[0]]
        answer = f"答案：{label}" if k == 0 else "答案：皮肤科，建议尽快就诊并完善相关检查。"
        return 200, {}, chat(answer, reasoning=f"患者问：{prompt[:40]}。症状提示与{label}相关，需要结合病史判断。")

    with FakeTeacher(triage) as t:
        cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "distill": {
            "input": str(medical_csv), "max_prompts": 6, "samples_per_prompt": 2,
            "prompt_template": "{prompt}\n请判断应该挂哪个科室，最后一行写“答案：科室名称”。",
            "teacher": {"base_url": t.url, "seed": 0},
            "verify": {"reference": "label", "rewards": [{"name": "contains"},
                                                          {"name": "my_rewards:short_answer", "args": {"max_chars": 12}}],
                       "min_reward": 2.0}}})
        m = run_distill(cfg, RunDir(cfg.run_dir))
    assert m["counts"] == {"samples": 12, "kept": 6, "dropped": {"wrong_answer": 6}}
    kept = read_jsonl(tmp_path / "run/distill/verified.jsonl")
    assert all(r["source"]["sample"] == 0 and r["label"] in r["fields"]["answer"] for r in kept)
    assert all(r["messages"][-2]["content"].endswith("最后一行写“答案：科室名称”。") for r in kept)
