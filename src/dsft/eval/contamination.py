"""Contamination check: eval items whose n-grams largely occur in one training item (listed as pairs)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from dsft.eval.metrics import detect_lang, mixed_segmentation


def record_text(record: dict[str, Any]) -> str:
    """All non-system message contents of a record (question, context, answer)."""
    msgs = record.get("messages") or []
    if msgs:
        return "\n".join(str(m.get("content") or "") for m in msgs if m.get("role") != "system")
    f = record.get("fields") or {}
    return "\n".join(str(f.get(k) or "") for k in ("question", "context", "answer"))


def ngrams(text: str, n: int, lang: str) -> set[tuple[str, ...]]:
    """Set of n-grams over characters (Chinese; punctuation dropped) or lower-cased words (other text)."""
    toks = mixed_segmentation(text) if lang == "zh" else re.findall(r"\w+", text.lower())
    if len(toks) < n:
        return {tuple(toks)} if toks else set()
    return {tuple(toks[i: i + n]) for i in range(len(toks) - n + 1)}


def check(eval_records: Sequence[dict[str, Any]], train_records: Sequence[dict[str, Any]], *, n: int = 8,
          threshold: float = 0.5, lang: str = "auto", max_pairs: int = 200) -> dict[str, Any]:
    """For each eval item, the training item sharing the largest fraction of its n-grams; flag ≥ threshold.

    Returns {n, threshold, lang, checked, flagged, rate, pairs: [{eval_id, train_id, overlap, eval_text, train_text}]}
    with pairs sorted by overlap (highest first).
    """
    eval_texts = [record_text(r) for r in eval_records]
    train_texts = [record_text(r) for r in train_records]
    if lang == "auto":
        lang = detect_lang(eval_texts[:200])
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for j, t in enumerate(train_texts):
        for g in ngrams(t, n, lang):
            index[g].append(j)
    pairs = []
    for i, t in enumerate(eval_texts):
        grams = ngrams(t, n, lang)
        if not grams:
            continue
        hits: Counter[int] = Counter()
        for g in grams:
            hits.update(index.get(g, ()))
        if not hits:
            continue
        j, c = hits.most_common(1)[0]
        overlap = c / len(grams)
        if overlap >= threshold:
            pairs.append({"eval_id": eval_records[i].get("id", i), "train_id": train_records[j].get("id", j),
                          "overlap": round(overlap, 4), "eval_text": _clip(t), "train_text": _clip(train_texts[j])})
    pairs.sort(key=lambda p: -p["overlap"])
    checked = len(eval_texts)
    return {"n": n, "threshold": threshold, "lang": lang, "checked": checked, "flagged": len(pairs),
            "rate": len(pairs) / checked if checked else 0.0, "pairs": pairs[:max_pairs]}


def _clip(s: str, k: int = 120) -> str:
    s = " ".join(s.split())
    return s if len(s) <= k else s[:k] + " …"
