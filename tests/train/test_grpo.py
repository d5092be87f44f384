"""GRPO: learns a verifiable toy task after an SFT warm-up, stops loudly on truncation / zero advantage / a
failing reward, resumes bit-exactly (sampler included), and its loss pieces are right."""

from __future__ import annotations

import json

import pytest
import torch
from pref_helpers import assert_grpo_resume_is_bit_exact, grpo_cfg, grpo_rewards, toy_prompts, warm_model
from train_helpers import make_run

from dsft.errors import TrainError
from dsft.eval.stage import evaluate
from dsft.rewards import numeric
from dsft.train import train
from dsft.train.objectives.grpo import group_advantages, token_losses


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return warm_model(tmp_path_factory.mktemp("warm"))


_rewards = grpo_rewards


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

    assert_grpo_resume_is_bit_exact(cfg, tmp_path)


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


def _prompt_ids(tok, n: int) -> list[list[int]]:
    """Chat-templated toy prompts of different lengths (left padding in a batch is exercised)."""
    out = []
    for k, rec in enumerate(toy_prompts(n, offset=7)):
        msgs = [{"role": "user", "content": rec["prompt"][0]["content"] + "请说明理由。" * (k % 3)}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_batched_sampler_draws_what_generate_draws(warm, temperature, top_p):
    """sample_groups (all prompts in one batch, one prefill per prompt shared by its G rows) returns the same tokens
    as transformers generate called per prompt with the same seed (sample_group), ended and truncated rows alike."""
    from transformers import AutoTokenizer

    from dsft.model.load import load_model, resolve_model_dir
    from dsft.train.objectives.rollout import sample_group, sample_groups

    for path in (warm, resolve_model_dir("embedded:tiny-deepseek-v3")):  # answers that end; random text that never does
        model = load_model(path, dtype="float32").eval()
        tok = AutoTokenizer.from_pretrained(str(path))
        prompts = _prompt_ids(tok, 5)
        assert len({len(p) for p in prompts}) == 3
        seeds = [11 + 3 * k for k in range(5)]
        old = [sample_group(model, tok, p, 4, max_new_tokens=6, temperature=temperature, top_p=top_p, seed=s)
               for p, s in zip(prompts, seeds, strict=True)]
        new = sample_groups(model, tok, prompts, 4, max_new_tokens=6, temperature=temperature, top_p=top_p,
                            seeds=seeds)
        assert [[(c.ids, c.text, c.truncated) for c in g] for g in new] == \
            [[(c.ids, c.text, c.truncated) for c in g] for g in old]
        ended = sum(not c.truncated for g in new for c in g)
        assert (ended > 0) if path == warm else (ended == 0)


def test_warp_scores_matches_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from dsft.train.objectives.rollout import warp_scores

    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    for temperature, top_p in [(1.0, 1.0), (0.6, 1.0), (1.0, 0.5), (1.3, 0.9), (1.0, 1e-6)]:
        want = scores.clone()
        if temperature != 1.0:
            want = TemperatureLogitsWarper(temperature)(ids, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(ids, want)
        got = warp_scores(scores.clone(), temperature=temperature, top_p=top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.allclose(got, want)
    assert (torch.isfinite(warp_scores(scores, temperature=1.0, top_p=1e-6)).sum(dim=1) == 1).all()


def _rollouts(n: int, seed: int) -> list:
    """n rollouts of random prompt (5–9 tokens) + completion (1–4 tokens) ids, random advantages and weights."""
    from dsft.train.encode import IGNORE
    from dsft.train.objectives.grpo import Rollout

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        p, c = (torch.randint(3, 7000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                for lo, hi in ((5, 10), (1, 5)))
        out.append(Rollout(p + c, [IGNORE] * len(p) + c, f"r{k}", key=100 + k,
                           advantage=float(torch.randn(1, generator=g)), weight=float(torch.rand(1, generator=g))))
    return out


def _reference_loss(model, ref_model, units, cfg) -> tuple[torch.Tensor, list[float]]:
    """The GRPO loss written out one rollout at a time from full-vocabulary logits: Σ weight × (−ρ·A + β·k3 KL) over
    completion tokens, with ρ = exp(logp − logp.detach()) (μ = 1); returns (loss, each rollout's mean KL)."""
    total, kls = torch.zeros(()), []
    for u in units:
        ids = torch.tensor([u.input_ids])
        tgt = torch.tensor(u.labels[1:])
        keep = tgt != -100
        lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1] / cfg.temperature, -1)
        lp = lp.gather(1, tgt.clamp(min=0)[:, None])[:, 0][keep]
        with torch.no_grad():
            rl = torch.log_softmax(ref_model(input_ids=ids, use_cache=False).logits[0, :-1] / cfg.temperature, -1)
            rl = rl.gather(1, tgt.clamp(min=0)[:, None])[:, 0][keep]
        kl = torch.exp(rl - lp) - (rl - lp) - 1
        total = total + (u.weight * (-torch.exp(lp - lp.detach()) * u.advantage + cfg.beta * kl)).sum()
        kls.append(float(kl.detach().mean()))
    return total, kls


@pytest.mark.parametrize("packing", [True, False])
def test_grpo_loss_and_gradients_match_a_written_out_reference(tmp_path, packing):
    """GrpoLoss on a collated micro-batch (packed or padded) gives the loss, every parameter's gradient and the
    per-rollout KL of the GRPO objective computed naively, rollout by rollout, from full logits."""
    from dsft.model.load import load_model, resolve_model_dir
    from dsft.train.objectives.common import Reference, disable_dropout
    from dsft.train.objectives.grpo import GrpoLoss, collate_rollouts

    model = load_model(resolve_model_dir("embedded:tiny-deepseek-v3"), dtype="float32").train()
    disable_dropout(model)
    cfg = grpo_cfg(tmp_path, "unused", beta=0.3, temperature=0.8).grpo
    ref = Reference(model, adapters=False)
    with torch.no_grad():  # the policy moves away from the reference so the KL term is not zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    units = _rollouts(10, seed=3)
    loss_mod = GrpoLoss(model, cfg, reference=ref, chunk_size=7)
    got = loss_mod(collate_rollouts(units, packing=packing, capacity=24, pad_id=0))
    got.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want, kls = _reference_loss(model, ref.copy, units, cfg)
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (float(got), float(want))
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and len(grads) > 20
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert float((grads[n] - p.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()) + 1e-8, n
    assert [loss_mod.stats[str(u.key)]["kl"] for u in units] == pytest.approx(kls, rel=1e-4, abs=1e-7)
    assert min(kls) > 0 and all(s["clip"] == 0 for s in loss_mod.stats.values())
