"""Verification of the sampled traces: filters (filters.py), correctness with the shared reward functions
(dsft.rewards) against each prompt's reference, a per-prompt cap and MinHash dedup of the traces. Every sample is
kept or dropped with its reason: samples = kept + Σ dropped."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from dsft.config.distill import VerifyConfig
from dsft.data.distill.filters import check_sample
from dsft.data.distill.prompts import PromptItem
from dsft.data.minhash import near_dedup
from dsft.errors import DataError
from dsft.rewards import Reward, RewardError, after_think, load_rewards, normalize_text, score

THINK_BLOCK = "<think>\n{reasoning}\n</think>\n\n{answer}"
"""R1's output shape: the reasoning in a think block, a blank line, the answer."""
CLIP = 500


def contains(completion: str, record: dict[str, Any], *, key: str = "answer", **_: Any) -> float:
    """1 when the answer part (after `</think>`) contains the reference (normalised text), else 0 — for free-text
    answers that name a label, e.g. a department."""
    ref = record.get(key) if record.get(key) is not None else (record.get("meta") or {}).get(key)
    if ref is None:
        raise ValueError(f"the record has no '{key}' to compare with")
    return float(normalize_text(str(ref)) in normalize_text(after_think(completion)))


EXTRA_REWARDS = {"contains": f"{__name__}:contains"}


def load_verifiers(v: VerifyConfig) -> list[Reward]:
    """The configured reward functions (dsft.rewards built-ins, `module:function`, or distill's `contains`)."""
    if not v.rewards:
        return []
    specs = [{"name": EXTRA_REWARDS.get(r.name, r.name), "weight": r.weight, "args": r.args} for r in v.rewards]
    loaded = load_rewards(specs, "distill.verify.rewards")
    return [dataclasses.replace(rw, name=r.name) for rw, r in zip(loaded, v.rewards, strict=True)]


def completion_text(s: dict[str, Any]) -> str:
    """The sample as one R1-style completion (what the reward functions and the training record see)."""
    if s.get("reasoning") is None:
        return s.get("answer") or ""
    return THINK_BLOCK.format(reasoning=s["reasoning"], answer=s.get("answer") or "")


def trace_record(p: PromptItem, s: dict[str, Any], teacher: str, reward: float | None) -> dict[str, Any]:
    """A kept sample as a canonical training record (the assistant turn holds the think block and the answer)."""
    return {"id": f"{p.id}#{s['k']}", "messages": [*p.messages, {"role": "assistant", "content": completion_text(s)}],
            "fields": {"question": p.question, "answer": s["answer"]}, "reasoning": s.get("reasoning"),
            "label": p.label, "source": {"prompt_id": p.id, "sample": s["k"]}, "provenance": f"distilled:{teacher}",
            "think": True, "reward": reward}


def _dropped(p_id: str, s: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"prompt_id": p_id, "sample": s.get("k"), "reason": reason, "detail": detail[:300],
            "reasoning": (s.get("reasoning") or "")[:CLIP], "answer": (s.get("answer") or "")[:CLIP]}


def _correct(rewards: list[Reward], v: VerifyConfig, p: PromptItem, s: dict[str, Any]) -> tuple[float | None, tuple[str, str] | None]:
    if not rewards:
        return None, None
    if p.reference is None:
        return None, ("no_reference", f"the prompt has no '{v.reference}' to verify against")
    try:
        total, parts = score(rewards, completion_text(s), p.reward_record())
    except RewardError as err:
        return None, ("reward_error", str(err).split(" — ")[0])
    if total < v.min_reward:
        return total, ("wrong_answer", f"reward {total:g} < {v.min_reward:g} {parts}; reference {p.reference[:80]!r}")
    return total, None


def verify(rows: list[dict[str, Any]], prompts: dict[str, PromptItem], v: VerifyConfig
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(kept records in input order, dropped rows, stats) of the samples in samples.jsonl rows."""
    rewards = load_verifiers(v)
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    n_samples = checked = 0
    for row in sorted(rows, key=lambda r: prompts[r["prompt_id"]].index if r["prompt_id"] in prompts else -1):
        p = prompts.get(row["prompt_id"])
        for s in row["samples"]:
            n_samples += 1
            if p is None:
                dropped.append(_dropped(row["prompt_id"], s, "prompt_not_in_input", "the prompt is no longer in "
                                        "distill.input (or outside max_prompts)"))
                continue
            bad = check_sample(s, p.question, v)
            reward = None
            if bad is None:
                checked += 1
                reward, bad = _correct(rewards, v, p, s)
            if bad:
                dropped.append(_dropped(row["prompt_id"], s, *bad))
            else:
                kept.append(trace_record(p, s, row.get("teacher", ""), reward))
    by_reason = Counter(d["reason"] for d in dropped)
    if checked and by_reason.get("reward_error") == checked:
        first = next(d for d in dropped if d["reason"] == "reward_error")
        raise DataError(f"distill.verify.rewards: every sample failed to score; first: {first['detail']}")
    kept, dups, dedup_stats = dedup_traces(kept, v)  # before the cap, so the cap picks distinct traces
    kept, surplus = cap_per_prompt(kept, v.max_per_prompt)
    dropped += dups + surplus
    return kept, dropped, {"samples": n_samples, "kept": len(kept), "dropped": dict(Counter(d["reason"] for d in dropped)),
                           "correctness": [r.name for r in rewards] or "not checked", "dedup": dedup_stats}


def cap_per_prompt(kept: list[dict[str, Any]], cap: int | None) -> tuple[list[dict], list[dict]]:
    """At most `cap` kept traces per prompt (the first ones); the others dropped as surplus_per_prompt."""
    if cap is None:
        return kept, []
    seen: Counter = Counter()
    out, surplus = [], []
    for r in kept:
        pid = r["source"]["prompt_id"]
        seen[pid] += 1
        if seen[pid] <= cap:
            out.append(r)
        else:
            s = {"k": r["source"]["sample"], "reasoning": r["reasoning"], "answer": r["fields"]["answer"]}
            surplus.append(_dropped(pid, s, "surplus_per_prompt", f"already {cap} kept for this prompt"))
    return out, surplus


def dedup_traces(kept: list[dict[str, Any]], v: VerifyConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """MinHash near-duplicates among the kept traces (reasoning + answer); the first of each cluster stays."""
    d = v.dedup
    if not d.enabled or len(kept) < 2:
        return kept, [], {"enabled": d.enabled}
    texts = [f"{r['reasoning'] or ''}\n{r['fields']['answer']}" for r in kept]
    res = near_dedup(texts, threshold=d.threshold, num_perm=d.num_perm, ngram=d.ngram, word_ngram=d.word_ngram,
                     seed=d.seed)
    dropped = []
    for x in res.duplicates:
        r = kept[x["index"]]
        s = {"k": r["source"]["sample"], "reasoning": r["reasoning"], "answer": r["fields"]["answer"]}
        other = kept[x["duplicate_of"]]["id"]
        dropped.append(_dropped(r["source"]["prompt_id"], s, "near_duplicate",
                                f"duplicate of {other} (Jaccard {x['jaccard']:.3f})"))
    stats = {k: res.stats.get(k) for k in ("threshold", "bands", "rows", "candidates", "pairs")}
    return [r for r, keep in zip(kept, res.keep.tolist(), strict=True) if keep], dropped, stats
