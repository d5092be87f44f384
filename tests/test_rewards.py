"""The verifiable rewards: answer extraction (\\boxed{}, cues, R1 think), each built-in, entry points, errors."""

from __future__ import annotations

import pytest

from dsft import rewards as rw
from dsft.errors import ConfigError, TrainError

REC = {"id": "r1", "answer": "42"}


def test_answer_extraction():
    assert rw.last_boxed(r"x \boxed{\frac{1}{2}} then \boxed{7}") == "7"
    assert rw.last_boxed(r"\boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert rw.extract_answer("<think>可能是 41</think>\n答案：42。") == "42。"
    assert rw.extract_answer("first line\nthe end 42") == "the end 42"
    assert rw.parse_number("共 1,234.5 元") == 1234.5 and rw.parse_number(r"\frac{3}{4}") == 0.75
    assert rw.parse_number("3/4") == 0.75 and rw.parse_number("无") is None


@pytest.mark.parametrize(("completion", "value"), [
    (r"所以 \boxed{42}", 1.0), ("答案是 42", 1.0), ("<think>40+2</think>42.0", 1.0), ("43", 0.0), ("无", 0.0)])
def test_numeric(completion, value):
    assert rw.numeric(completion, REC) == value


def test_numeric_without_extraction_refuses_several_guesses():
    assert rw.numeric("41\n42", REC) == 1.0  # the last number
    assert rw.numeric("41\n42", REC, extract=False) == 0.0 and rw.numeric(" 42 ", REC, extract=False) == 1.0


def test_exact_boxed_choice_regex_length():
    assert rw.exact("答案：北京。", {"answer": "北京"}) == 1.0
    assert rw.boxed("42", REC) == 0.0 and rw.boxed(r"\boxed{42}", REC) == 1.0
    assert rw.choice("分析……所以选 B", {"answer": "B"}) == 1.0 and rw.choice("A 不对，答案 C", {"answer": "B"}) == 0.0
    assert rw.regex("结论：好", {}, pattern="^结论") == 1.0 and rw.regex("x 结论", {}, pattern="^结论") == 0.0
    assert rw.length("a" * 100, {}, target=100) == 1.0 and rw.length("a" * 150, {}, target=100) == 0.5


def test_json_schema_and_think_format():
    schema = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
    assert rw.json_schema('结果：```json\n{"ok": true}\n```', {}, schema=schema) == 1.0
    assert rw.json_schema('{"ok": "yes"}', {}, schema=schema) == 0.0
    assert rw.json_schema("不是 JSON", {"meta": {"schema": schema}}) == 0.0
    with pytest.raises(ValueError, match="needs args.schema"):
        rw.json_schema("{}", {})
    assert rw.think_format("<think>先算</think>42", {}) == 1.0
    assert rw.think_format("先算</think>42", {}) == 1.0  # the R1 template put <think> in the prompt
    assert rw.think_format("<think>先算</think>", {}) == 0.0 and rw.think_format("42", {}) == 0.0
    assert rw.think_format("<think>a</think>b</think>c", {}) == 0.0


def test_load_and_score_with_weights_and_entry_points():
    loaded = rw.load_rewards([{"name": "numeric", "weight": 2.0}, {"name": "dsft.rewards:think_format"}])
    total, parts = rw.score(loaded, r"<think>x</think>\boxed{42}", REC)
    assert total == 3.0 and parts == {"numeric": 1.0, "dsft.rewards:think_format": 1.0}
    with pytest.raises(ConfigError, match="cannot import no_such_mod"):
        rw.load_rewards([{"name": "no_such_mod:f"}])
    with pytest.raises(ConfigError, match="expected a built-in"):
        rw.load_rewards([{"name": "nope"}])
    with pytest.raises(ConfigError, match="not a regular expression"):
        rw.load_rewards([{"name": "regex", "args": {"pattern": "("}}])


def test_a_raising_or_nan_reward_is_one_clear_error():
    bad = [rw.Reward("numeric", 1.0, {}, rw.numeric)]
    with pytest.raises(TrainError, match=r"reward function numeric raised ValueError.*record 'x'"):
        rw.score(bad, "42", {"id": "x"})  # no answer to compare with
    nan = [rw.Reward("mine", 1.0, {}, lambda c, r: float("nan"))]
    with pytest.raises(rw.RewardError, match="returned nan"):
        rw.score(nan, "42", REC)
