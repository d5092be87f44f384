"""Summary statistics of a dataset (counts, lengths, labels, duplicates): `dsft data stats` and the report."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from dsft.config import DataConfig
from dsft.data.dedup import exact_dedup
from dsft.data.load import load_records, require_records


def length_stats(values: list[int]) -> dict[str, float]:
    """count, mean, p50, p90, p99, max of a list of lengths."""
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {"count": int(a.size), "mean": round(float(a.mean()), 1), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def record_lengths(records: list[dict]) -> dict[str, list[int]]:
    """Character lengths per field: question, context, answer (seed view) and the whole conversation."""
    out: dict[str, list[int]] = {"question": [], "context": [], "answer": [], "conversation": []}
    for r in records:
        f = r.get("fields") or {}
        for k in ("question", "context", "answer"):
            if f.get(k):
                out[k].append(len(f[k]))
        out["conversation"].append(sum(len(m["content"]) for m in r["messages"]))
    return {k: v for k, v in out.items() if v}


def summarize(records: list[dict], rejected: list[dict], infos: list[dict], dedup_fields: list[str],
              tokenizer: str | None = None) -> dict[str, Any]:
    """The summary `dsft data stats` prints (token lengths too when a tokenizer is named)."""
    _, dups = exact_dedup(records, dedup_fields)
    tokens: dict[str, Any] = {}
    if tokenizer:
        from dsft.data.tokens import count_tokens

        for k in ("question", "answer"):
            texts = [(r.get("fields") or {}).get(k) for r in records]
            if any(texts):
                tokens[k] = length_stats(count_tokens(tokenizer, [t for t in texts if t]))
        tokens["conversation"] = length_stats(count_tokens(tokenizer, ["\n".join(m["content"] for m in r["messages"]) for r in records]))
    return {
        "files": [{k: i.get(k) for k in ("file", "kind", "encoding", "schema", "rows", "valid")} for i in infos],
        "records": len(records) + len(rejected),
        "valid": len(records),
        "rejected": dict(Counter(r["reason"] for r in rejected)),
        "exact_duplicates": len(dups),
        "labels": dict(Counter(str(r.get("label")) for r in records).most_common()),
        "lengths_chars": {k: length_stats(v) for k, v in record_lengths(records).items()},
        "turns": length_stats([len(r["messages"]) for r in records]),
        "lengths_tokens": tokens,
        "tokenizer": tokenizer,
    }


def stats_for_paths(paths: list[str], *, encoding: str = "auto", fmt: str = "auto", label_field: str | None = "domain",
                    columns: dict[str, str] | None = None, tokenizer: str | None = None) -> dict[str, Any]:
    cfg = DataConfig(path=list(paths), encoding=encoding, format=fmt, label_field=label_field, columns=columns or {})
    records, rejected, infos = load_records(cfg)
    require_records(len(records) + len(rejected), infos)
    return summarize(records, rejected, infos, list(cfg.dedup_fields), tokenizer)


def stats_text(st: dict[str, Any]) -> str:
    """Human-readable form of the summary."""
    lines = []
    for f in st["files"]:
        lines.append(f"{f['file']}: {f['kind']}, {f['encoding']}, schema {f['schema']}, {f['rows']} rows, {f.get('valid')} valid")
    why = f" {json.dumps(st['rejected'], ensure_ascii=False)}" if st["rejected"] else ""
    lines.append(f"records {st['records']}: valid {st['valid']}, rejected {sum(st['rejected'].values())}{why}, "
                 f"exact duplicates {st['exact_duplicates']}")
    if any(k != "None" for k in st["labels"]):
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in st["labels"].items()))
    for k, s in st["lengths_chars"].items():
        if s.get("count"):
            lines.append(f"{k:>12} chars: mean {s['mean']}, p50 {s['p50']:.0f}, p90 {s['p90']:.0f}, max {s['max']} (n={s['count']})")
    for k, s in (st.get("lengths_tokens") or {}).items():
        if s.get("count"):
            lines.append(f"{k:>12} tokens: mean {s['mean']}, p50 {s['p50']:.0f}, p90 {s['p90']:.0f}, max {s['max']} (n={s['count']})")
    t = st["turns"]
    lines.append(f"{'turns':>12}: mean {t.get('mean')}, max {t.get('max')}")
    return "\n".join(lines)
