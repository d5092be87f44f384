"""The mix: verified reasoning records + non-reasoning records at a stated share. Non-reasoning answers follow R1's
convention, an empty think block (`<think>\\n\\n</think>\\n\\n` + answer), so the model learns when not to think."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from dsft.config.data import DataConfig
from dsft.config.distill import MixConfig
from dsft.data.load import load_records

EMPTY_THINK = "<think>\n\n</think>\n\n"


def non_reasoning_records(m: MixConfig) -> tuple[list[dict[str, Any]], Counter]:
    """The mix's non-reasoning records (answer behind an empty think block) and why others were left out."""
    if not m.non_reasoning:
        return [], Counter()
    d = DataConfig(path=m.non_reasoning, format=m.format, encoding=m.encoding, columns=m.columns)
    records, rejected, _ = load_records(d)
    skipped: Counter = Counter({"invalid": len(rejected)} if rejected else {})
    out = []
    for rec in records:
        msgs = rec["messages"]
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            skipped["no_answer"] += 1
            continue
        if "</think>" in msgs[-1]["content"]:
            skipped["already_has_think"] += 1
            continue
        answer = msgs[-1]["content"].strip()
        out.append({**rec, "messages": [*msgs[:-1], {"role": "assistant", "content": EMPTY_THINK + answer}],
                    "think": False})
    return out, skipped


def counts_for_share(n_r: int, n_n: int, share: float, strategy: str) -> tuple[int, int]:
    """(reasoning, non-reasoning) record counts whose reasoning share is `share`: downsample takes no record twice,
    upsample keeps every record and repeats the smaller side."""
    if n_n == 0 or share >= 1:
        return n_r, 0
    if n_r == 0:  # no reasoning record: the share cannot be met, and a mix of only plain answers is not one
        return 0, 0
    ratio = share / (1 - share)  # reasoning records per non-reasoning record
    too_many_reasoning = n_r > ratio * n_n
    if strategy == "downsample":
        return (min(n_r, round(ratio * n_n)), n_n) if too_many_reasoning else (n_r, min(n_n, round(n_r / ratio)))
    return (n_r, max(n_n, round(n_r / ratio))) if too_many_reasoning else (max(n_r, round(ratio * n_n)), n_n)


def _take(records: list[dict], k: int, rng: random.Random) -> list[dict]:
    """k records: a seeded sample (k ≤ n) or every record as often as fits plus a seeded sample of the rest."""
    n = len(records)
    if k <= n:
        return [records[i] for i in sorted(rng.sample(range(n), k))]
    return records * (k // n) + [records[i] for i in sorted(rng.sample(range(n), k % n))]


def mix(reasoning: list[dict[str, Any]], m: MixConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shuffled mix and its stats (available, used, repeated, target and actual share)."""
    plain, skipped = non_reasoning_records(m)
    want_r, want_n = counts_for_share(len(reasoning), len(plain), m.reasoning_share, m.strategy)
    rng = random.Random(m.seed)
    used_r, used_n = _take(reasoning, want_r, rng), _take(plain, want_n, rng)
    mixed = used_r + used_n
    rng.shuffle(mixed)
    total = len(mixed)
    stats = {"reasoning_available": len(reasoning), "non_reasoning_available": len(plain),
             "reasoning": len(used_r), "non_reasoning": len(used_n), "total": total,
             "repeated": {"reasoning": max(0, want_r - len(reasoning)), "non_reasoning": max(0, want_n - len(plain))},
             "share_target": m.reasoning_share if plain else 1.0,
             "share_actual": round(len(used_r) / total, 4) if total else None,
             "strategy": m.strategy, "non_reasoning_skipped": dict(skipped),
             "non_reasoning_files": m.non_reasoning}
    return mixed, stats
