"""GRPO: learns a verifiable toy task after an SFT warm-up, stops loudly on truncation / zero advantage / a
failing reward, resumes bit-exactly (sampler included), and its loss pieces are right."""

from __future__ import annotations

import json

import pytest
import torch
from pref_helpers import grpo_cfg, toy_prompts, warm_model
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run

from dsft.errors import TrainError
from dsft.eval.stage import evaluate
from dsft.rewards import numeric
from dsft.train import train
from dsft.train.objectives.grpo import group_advantages, token_losses


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return warm_model(tmp_path_factory.mktemp("warm"))


def _rewards(stage) -> list[float]:
    return [json.loads(x)["objective"]["grpo/reward"] for x in (stage / "log.jsonl").read_text().splitlines()
            if '"grpo/reward"' in x]


def test_group_advantages_and_clipped_surrogate():
    assert group_advantages([1.0, 0.0, 1.0, 1.0], 2, scale=False) == [0.5, -0.5, 0.0, 0.0]
    adv = group_advantages([1.0, 0.0], 2, scale=True)
    assert adv[0] == pytest.approx(0.5 / (2 ** -0.5 + 1e-4))  # unbiased std of {1, 0} is 1/√2
    logp, old = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([-0.5, 0.5, -1.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, clipped, _ = token_losses(logp, old, adv, eps_low=0.2, eps_high=0.2)
    # ratios e^0.5 (> 1.2, A > 0: clipped at 1.2), e^-0.5 (< 0.8, A < 0: clipped at 0.8), 1
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, -2.0])) and clipped.tolist() == [True, True, False]
    loss, _, kl = token_losses(logp, logp, adv, eps_low=0.2, eps_high=0.2, beta=0.5, ref=torch.tensor([0.0, 1.0, -1.0]))
    assert kl[0] == 0 and kl[1] == pytest.approx(torch.e - 2) and loss[1] == pytest.approx(1 + 0.5 * (torch.e - 2))


def test_grpo_learns_the_toy_task(tmp_path, warm):
    """Reward < 0.3 at the first step (the warm-up taught the format, not the answer), > 0.8 at the end; the eval
    stage scores the held-out prompts with the same reward before and after (greedy answers)."""
    run = make_run(tmp_path, toy_prompts(24), eval_records=toy_prompts(6, offset=100))
    cfg = grpo_cfg(tmp_path, warm)
    m = train(cfg, run)
    rewards = _rewards(tmp_path / "train")
    assert rewards[0] < 0.3
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    assert m["objective"] == "grpo" and m["reward_last"] == rewards[-1]
    assert (tmp_path / "train/rewards.png").stat().st_size > 1000
    rec = json.loads((tmp_path / "train/log.jsonl").read_text().splitlines()[-1])
    assert {"grpo/reward_std", "grpo/completion_len", "grpo/truncated", "grpo/kl", "grpo/clip_ratio"} <= \
        rec["objective"].keys()
    cfg.eval.max_new_tokens = 8
    ev = evaluate(cfg, run)
    rows = [json.loads(x) for x in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]
    after = [r for r in rows if r["model"] == "finetuned"]
    assert len(after) == 6 and all(r["reward"] == numeric(r["prediction"], {"answer": "7"}, extract=False)
                                   for r in after)
    assert ev["after"]["reward"] == sum(r["reward"] for r in after) / 6
    assert ev["before"]["reward"] < 0.5 < ev["after"]["reward"] and ev["headline"].startswith("reward ")


def test_resume_mid_grpo_is_bit_exact(tmp_path, warm):
    def cfg(root):
        c = grpo_cfg(root, warm)
        c.train.max_steps, c.train.save_steps = 6, 3
        return c

    run = make_run(tmp_path / "ref", toy_prompts(24))
    train(cfg(tmp_path / "ref"), run)
    run = make_run(tmp_path / "k", toy_prompts(24))
    with pytest.raises(Crash):
        train(cfg(tmp_path / "k"), run, fault_hook=crash_at(5))
    train(cfg(tmp_path / "k"), run, resume="auto")
    a = load_file(str(tmp_path / "ref/train/model/model.safetensors"))
    b = load_file(str(tmp_path / "k/train/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rewards(tmp_path / "ref/train") == _rewards(tmp_path / "k/train")


def test_truncation_guard_stops_a_run_that_truncates(tmp_path):
    """The random-init model never ends within 4 tokens: the first step stops with the reason and the fix."""
    run = make_run(tmp_path, toy_prompts(8))
    cfg = grpo_cfg(tmp_path, "embedded:tiny-deepseek-v3", max_completion_length=4)
    cfg.train.method = "lora"
    with pytest.raises(TrainError, match=r"100% of the completions at step 1 hit grpo.max_completion_length 4.*"
                                         r"Raise grpo.max_completion_length"):
        train(cfg, run)
    events = [json.loads(x) for x in (tmp_path / "train/log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "grpo_truncation_stop"


def test_zero_advantage_guard(tmp_path, warm):
    run = make_run(tmp_path, toy_prompts(8))
    cfg = grpo_cfg(tmp_path, warm, zero_advantage_steps=2,
                   rewards=[{"name": "regex", "args": {"pattern": "never matches"}}])
    with pytest.raises(TrainError, match="same reward for 2 steps in a row"):
        train(cfg, run)


def test_a_raising_reward_function_stops_with_its_name(tmp_path, warm):
    run = make_run(tmp_path, toy_prompts(8))
    cfg = grpo_cfg(tmp_path, warm, rewards=[{"name": "pref_helpers:broken_reward"}])
    with pytest.raises(TrainError, match=r"reward function pref_helpers:broken_reward raised KeyError.*record 'toy:"):
        train(cfg, run)


def test_oom_ladder_mid_grpo_retries_the_same_rollouts(tmp_path, warm):
    """An out-of-memory error at step 2 halves the micro-batch (prompts × G completions) twice and retries the step
    on the rollouts already sampled: same rewards, and the same loss as the run without the error (dapo's
    normaliser does not depend on the split)."""
    def cfg(root):
        c = grpo_cfg(root, warm)
        c.train.max_steps = 3
        return c

    train(cfg(tmp_path / "ref"), make_run(tmp_path / "ref", toy_prompts(24)))
    seen = []

    def oom(step, micro):
        seen.append((step, micro))
        if step == 2 and micro > 16:
            raise torch.OutOfMemoryError("injected")

    m = train(cfg(tmp_path / "oom"), make_run(tmp_path / "oom", toy_prompts(24)), fault_hook=oom)
    log = [json.loads(x) for x in (tmp_path / "oom/train/log.jsonl").read_text().splitlines()]
    actions = [r["action"] for r in log if r.get("event") == "oom"]
    assert len(actions) == 2 and "halved to 4" in actions[0] and "halved to 2" in actions[1]
    assert (2, 64) in seen and (2, 16) in seen and m["micro_batch"] == 2
    ref = [json.loads(x) for x in (tmp_path / "ref/train/log.jsonl").read_text().splitlines()]
    assert _rewards(tmp_path / "oom/train")[:2] == _rewards(tmp_path / "ref/train")[:2]
    la, lb = ([r["loss"] for r in lg if "loss" in r and "event" not in r] for lg in (log, ref))
    assert la[0] == lb[0] and abs(la[1] - lb[1]) < 1e-5
