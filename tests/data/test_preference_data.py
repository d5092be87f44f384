"""Preference pairs and RL prompts through the data stage: formats, validation, accounting, dedup, decontamination,
the packaged samples, and the train stage reading what it writes."""

from __future__ import annotations

import json

import pytest

from dsft.config import config_from_dict
from dsft.data.stage import run as data_run
from dsft.errors import DataError
from dsft.run import RunDir, read_jsonl


def _cfg(tmp_path, path, objective="dpo", **data):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "train": {"objective": objective},
                             "data": {"path": path, **data}})


def _write(tmp_path, rows, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                 encoding="utf-8")
    return str(p)


PAIRS = [
    {"prompt": "头痛怎么办？", "chosen": "注意休息，必要时就医。", "rejected": "不知道。"},
    {"instruction": "解释高血压", "input": "简短", "chosen": "血压持续偏高。", "rejected": "随便。"},
    {"messages": [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "发烧了"}],
     "chosen": {"role": "assistant", "content": "多喝水，测体温。"}, "rejected": [{"role": "assistant", "content": "没事"}]},
    {"conversations": [{"from": "human", "value": "咳嗽怎么办"}], "chosen": {"from": "gpt", "value": "止咳，就医。"},
     "rejected": {"from": "gpt", "value": "忍着"}},
    {"prompt": "头痛怎么办？", "chosen": "注意休息，必要时就医。", "rejected": "不知道。"},  # duplicate
    {"prompt": "缺 rejected", "chosen": "有"},
    {"prompt": "一样", "chosen": "同", "rejected": "同"},
    {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x", "rejected": "y"},
]


def test_pairs_in_every_format_and_the_accounting(tmp_path):
    m = data_run(_cfg(tmp_path, _write(tmp_path, PAIRS), test_size=0.25), RunDir(tmp_path / "run"))
    c = m["counts"]
    assert c["input"] == 8 and c["kept"] == 4
    assert c["dropped"] == {"duplicate": 1, "no_rejected": 1, "identical_answers": 1, "prompt_not_ending_with_user": 1}
    assert c["input"] == c["kept"] + sum(c["dropped"].values()) and c["train"] + c["test"] + c["eval"] == 4
    recs = read_jsonl(tmp_path / "run/data/train.jsonl") + read_jsonl(tmp_path / "run/data/test.jsonl")
    by_chosen = {r["chosen"]: r for r in recs}
    assert by_chosen["多喝水，测体温。"]["prompt"][0] == {"role": "system", "content": "你是医生"}
    assert by_chosen["血压持续偏高。"]["prompt"][-1]["content"] == "解释高血压\n简短"
    assert by_chosen["止咳，就医。"]["rejected"] == "忍着"
    rej = [r["reason"] for r in read_jsonl(tmp_path / "run/data/rejected.jsonl")]
    assert "identical_answers" in rej and "no_rejected" in rej and m["kind"] == "preference"


def test_strict_names_file_line_and_reason(tmp_path):
    path = _write(tmp_path, PAIRS[:5] + [PAIRS[5]])
    with pytest.raises(DataError, match=r"pairs.jsonl:6: no_rejected: missing 'rejected' \(--strict\)"):
        data_run(_cfg(tmp_path, path, strict=True), RunDir(tmp_path / "run"))


def test_rl_prompts_keep_answer_and_meta(tmp_path):
    rows = [{"problem": "1+1=?", "answer": 2, "level": "easy"}, {"question": "写一个 JSON", "schema": {"type": "object"}},
            {"answer": "3"}]
    m = data_run(_cfg(tmp_path, _write(tmp_path, rows, "rl.jsonl"), "grpo", test_size=0.01),
                 RunDir(tmp_path / "run"))
    assert m["kind"] == "prompts" and m["counts"]["dropped"] == {"no_prompt": 1}
    recs = {r["prompt"][-1]["content"]: r for r in read_jsonl(tmp_path / "run/data/train.jsonl")}
    assert recs["1+1=?"]["answer"] == "2" and recs["1+1=?"]["meta"] == {"level": "easy"}
    assert recs["写一个 JSON"]["answer"] is None and recs["写一个 JSON"]["meta"]["schema"] == {"type": "object"}


def test_decontamination_drops_pairs_that_leak_the_eval_set(tmp_path):
    ev = _write(tmp_path, [{"question": "糖尿病患者每天应该怎样安排饮食和运动才比较合适呢"}], "eval.jsonl")
    rows = [{"prompt": "请问糖尿病患者每天应该怎样安排饮食和运动才比较合适呢？", "chosen": "少糖多动。", "rejected": "随便"},
            {"prompt": "头痛怎么办？", "chosen": "休息。", "rejected": "不知道"},
            {"prompt": "咳嗽怎么办？", "chosen": "就医。", "rejected": "不知道"}]
    cfg = _cfg(tmp_path, _write(tmp_path, rows), quality={"decontaminate": [ev]})
    m = data_run(cfg, RunDir(tmp_path / "run"))
    assert m["counts"]["dropped"] == {"contaminated": 1} and m["counts"]["kept"] == 2


@pytest.mark.parametrize(("name", "objective", "n"), [("embedded:preference_zh", "dpo", 40),
                                                       ("embedded:math_zh", "grpo", 60)])
def test_packaged_samples(tmp_path, name, objective, n):
    m = data_run(_cfg(tmp_path, name, objective), RunDir(tmp_path / "run"))
    assert m["counts"]["input"] == n and m["counts"]["kept"] == n


def test_train_reads_what_the_preference_data_stage_writes(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"path": "embedded:preference_zh",
                                                                        "max_seq_length": 192},
                            "train": {"objective": "dpo", "max_steps": 1, "per_device_train_batch_size": 2,
                                      "report_to": ["none"], "learning_rate": 1e-4}})
    from dsft.train import train

    run = RunDir(tmp_path / "run")
    data_run(cfg, run)
    m = train(cfg, run)
    assert m["steps"] == 1 and m["objective"] == "dpo" and m["encode"]["total"] == 36
