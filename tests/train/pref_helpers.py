"""Helpers for preference / GRPO tests: pairs and verifiable prompts built from real packaged data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from train_helpers import Crash, crash_at, make_run, medical_records

REFUSALS = ("抱歉，我无法回答这个问题。", "作为一个AI，我不能提供医疗建议，请咨询医生。", "这个问题我不清楚。")


def preference_records(n: int, *, offset: int = 0, answer_chars: int = 160) -> list[dict]:
    """n pairs from the shipped medical QA rows: the real answer is chosen, a boilerplate refusal rejected."""
    rows = [r for r in medical_records(n + offset, with_label_task=False)][offset:]
    out = []
    for k, r in enumerate(rows):
        q = r["messages"][0]["content"][:120]
        chosen = r["fields"]["answer"][:answer_chars]
        prompt = [{"role": "user", "content": q}]
        out.append({"id": f"pair:{offset + k}", "prompt": prompt, "chosen": chosen, "rejected": REFUSALS[k % 3],
                    "messages": [*prompt, {"role": "assistant", "content": chosen}]})
    return out



def toy_prompts(n: int, *, offset: int = 0) -> list[dict]:
    """The verifiable toy task: varied questions whose answer is the number 7 (reward `numeric` vs `answer`)."""
    out = []
    for k in range(offset, offset + n):
        prompt = [{"role": "user", "content": f"第{k}题：幸运数字是几？只回答一个数字。"}]
        out.append({"id": f"toy:{k}", "prompt": prompt, "answer": "7",
                    "messages": [*prompt, {"role": "assistant", "content": "7"}]})
    return out


def toy_warmup_records(n: int) -> list[dict]:
    """SFT warm-up on the format only: the same questions answered with the digits 0–9 in turn (7 one time in 10)."""
    return [{"id": f"warm:{k}", "messages": [*rec["prompt"], {"role": "assistant", "content": str(k % 10)}]}
            for k, rec in enumerate(toy_prompts(n))]


def broken_reward(completion: str, record: dict, **_) -> float:
    """A user reward (entry point pref_helpers:broken_reward) with a bug."""
    return {"7": 1.0}[completion.strip()]


def tiny_llama(out, *, seed: int = 0):
    """A random-init tiny Llama (dense, GQA) with the demo tokenizer and its chat template: a model vLLM's CPU build
    runs (the embedded tiny DeepSeek-V3's MLA sizes are not ones its CPU kernel supports)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def warm_model(root, steps: int = 30, base=None):
    """A tiny model (default: the embedded DeepSeek-V3; `base`: a model folder) fully fine-tuned for a few steps on
    the toy task's format (answers end, digits 0–9)."""
    from train_helpers import make_run, tiny_cfg

    from dsft.train import train

    run = make_run(root, toy_warmup_records(60))
    cfg = tiny_cfg(root, method="full", max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3)
    cfg.data.max_seq_length = 64
    if base is not None:
        cfg.model.name_or_path = str(base)
    train(cfg, run)
    return root / "train" / "model"


def grpo_cfg(root, model_dir, **grpo):
    from dsft.config import config_from_dict

    return config_from_dict({
        "run_dir": str(root), "model": {"name_or_path": str(model_dir)}, "data": {"max_seq_length": 64},
        "train": {"objective": "grpo", "method": "full", "max_steps": 18, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1,
                  "save_steps": 1000, "report_to": ["none"]},
        "grpo": {"num_generations": 8, "max_completion_length": 8, "beta": 0.1,
                 "rewards": [{"name": "numeric", "args": {"extract": False}}], **grpo}})


def grpo_rewards(stage: Path) -> list[float]:
    """The mean reward of every GRPO step, from a train stage's log.jsonl."""
    return [json.loads(x)["objective"]["grpo/reward"] for x in (stage / "log.jsonl").read_text().splitlines()
            if '"grpo/reward"' in x]


def assert_grpo_resume_is_bit_exact(cfg: Callable, tmp_path: Path) -> None:
    """cfg(root) → a 6-step GRPO config saving every 3 steps: a run killed at step 5 and resumed from checkpoint-3
    logs the uninterrupted run's rewards and ends with bit-identical weights."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from dsft.train import train

    train(cfg(tmp_path / "ref"), make_run(tmp_path / "ref", toy_prompts(24)))
    run = make_run(tmp_path / "k", toy_prompts(24))
    with pytest.raises(Crash):
        train(cfg(tmp_path / "k"), run, fault_hook=crash_at(5))
    train(cfg(tmp_path / "k"), run, resume="auto")
    a = load_file(str(tmp_path / "ref/train/model/model.safetensors"))
    b = load_file(str(tmp_path / "k/train/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert grpo_rewards(tmp_path / "ref/train") == grpo_rewards(tmp_path / "k/train")
