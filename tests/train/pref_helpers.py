"""Helpers for preference / GRPO tests: pairs and verifiable prompts built from real packaged data."""

from __future__ import annotations

from train_helpers import medical_records

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
