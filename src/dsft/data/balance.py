"""Class balancing of the training split: cap (undersample), floor (oversample) or temperature sampling."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any


def target_counts(counts: dict[str, int], method: str, cap: int | None, floor: int | None, temperature: float) -> dict[str, int]:
    """How many records each class should have after balancing."""
    if method == "none":
        return dict(counts)
    if method in ("cap", "floor", "cap_floor"):
        out = {}
        for k, n in counts.items():
            t = n
            if method in ("cap", "cap_floor") and cap is not None:
                t = min(t, cap)
            if method in ("floor", "cap_floor") and floor is not None:
                t = max(t, floor)
            out[k] = t
        return out
    if method == "temperature":
        total = sum(counts.values())
        w = {k: n ** temperature for k, n in counts.items()}
        z = sum(w.values())
        raw = {k: total * v / z for k, v in w.items()}
        out = {k: int(v) for k, v in raw.items()}
        for k in sorted(raw, key=lambda k: (-(raw[k] - int(raw[k])), k))[: total - sum(out.values())]:
            out[k] += 1  # largest remainders keep the total unchanged
        return {k: max(v, 1) for k, v in out.items()}
    raise ValueError(f"unknown balance method {method!r}")


def balance_plan(labels: list[str | None], method: str, *, cap: int | None = None, floor: int | None = None,
                 temperature: float = 0.5, seed: int = 42) -> tuple[set[int], list[tuple[int, int]], dict[str, Any]]:
    """Which training records to undersample away and which to repeat, from their labels alone:
    (dropped indices, [(index, copy number k)] in output order, info{method, before, after, oversampled, undersampled}).
    Records without a label are left alone."""
    if method in ("cap", "cap_floor") and cap is None:
        raise ValueError("data.balance.cap must be set for method cap/cap_floor")
    if method in ("floor", "cap_floor") and floor is None:
        raise ValueError("data.balance.floor must be set for method floor/cap_floor")
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab:
            groups.setdefault(str(lab), []).append(i)
    before = {k: len(v) for k, v in groups.items()}
    target = target_counts(before, method, cap, floor, temperature)
    dropped: set[int] = set()
    copies: list[tuple[int, int]] = []
    after: Counter[str] = Counter()
    for lab in sorted(groups):
        idx = groups[lab]
        rng = random.Random(f"{seed}:balance:{lab}")
        t = target[lab]
        if t <= len(idx):
            dropped |= set(idx) - set(rng.sample(idx, t))
        else:
            reps = t - len(idx)
            picks = [idx[k % len(idx)] for k in range(reps)] if reps >= len(idx) else []
            rest = reps - len(picks)
            picks += sorted(rng.sample(idx, rest)) if rest else []
            seen: Counter[int] = Counter()
            for i in picks:
                seen[i] += 1
                copies.append((i, seen[i]))
        after[lab] = min(t, len(idx)) + max(t - len(idx), 0)
    info = {"method": method, "before": dict(sorted(before.items())), "after": dict(sorted(after.items())),
            "oversampled": len(copies), "undersampled": len(dropped)}
    return dropped, copies, info


def oversampled_copy(rec: dict, k: int) -> dict:
    """The k-th repeat of a record by balancing."""
    return {**rec, "id": f"{rec['id']}#os{k}", "provenance": "oversampled"}


def balance(train: list[dict], method: str, *, cap: int | None = None, floor: int | None = None,
            temperature: float = 0.5, seed: int = 42) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """→ (balanced train, undersampled-away records, info{before, after}). Oversampled copies get
    `provenance: oversampled` and an id suffix `#os<k>` and follow the kept records; see `balance_plan`."""
    if method == "none":
        return train, [], {}
    dropped, copies, info = balance_plan([r.get("label") for r in train], method, cap=cap, floor=floor,
                                         temperature=temperature, seed=seed)
    out = [r for i, r in enumerate(train) if i not in dropped] + [oversampled_copy(train[i], k) for i, k in copies]
    return out, [r for i, r in enumerate(train) if i in dropped], info
