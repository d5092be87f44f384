"""Filtering steps of the data pipeline: sampling, quality filters, token lengths, decontamination."""

from __future__ import annotations

import random
from collections.abc import Callable

from dsft.data.context import StageContext
from dsft.data.schema import record_text
from dsft.data.store import Store

Verdict = tuple[str, str | None] | None  # (reason, detail) to drop a record, None to keep it


def filter_store(store: Store, ctx: StageContext, step: str, verdicts: Callable[[int, list[dict]], list[Verdict]]) -> Store:
    """Keep the records whose verdict is None; the others go to rejected.jsonl with their reason, in input order.
    verdicts(start, chunk) judges one chunk (start = the position of its first record)."""
    keep: list[int] = []
    for start, chunk in ctx.chunks(store, step):
        for k, (rec, v) in enumerate(zip(chunk, verdicts(start, chunk), strict=True)):
            if v is None:
                keep.append(start + k)
            else:
                ctx.drop(rec, v[0], v[1])
    return store.select(keep) if len(keep) < len(store) else store


def sample_step(store: Store, ctx: StageContext) -> Store:
    """data.max_samples: a deterministic sample (by data.seed) of the valid records."""
    n = ctx.d.max_samples
    chosen = set(random.Random(ctx.d.seed).sample(range(len(store)), n))
    why = ("max_samples", f"data.max_samples={n}")
    return filter_store(store, ctx, "max_samples", lambda start, chunk: [
        None if start + k in chosen else why for k in range(len(chunk))])


def quality_step(store: Store, ctx: StageContext) -> Store:
    """The quality filters (policy, not validity: --strict does not stop on them); PII masking rewrites records."""
    from dsft.data.quality import QualityFilter

    check = QualityFilter(ctx.d.quality.model_dump())
    out = store.writer()
    for _, chunk in ctx.chunks(store, "quality"):
        for (new, reason, detail, pii), rec in zip(ctx.map_each(check, chunk), chunk, strict=True):
            ctx.pii.update(pii)
            if new is None:
                ctx.drop(rec, reason, detail)
            else:
                out.add(new)
    return out.finish()


def token_step(store: Store, ctx: StageContext) -> Store:
    """data.quality.min_tokens / max_tokens, counted with the model's fast tokenizer."""
    from dsft.data.quality import token_filter
    from dsft.data.tokens import tokenizer_for

    q, name = ctx.d.quality.model_dump(), tokenizer_for(ctx.cfg)
    return filter_store(store, ctx, "tokens", lambda start, chunk: token_filter(chunk, q, name))


def decontaminate_step(store: Store, ctx: StageContext) -> Store:
    """Drop records sharing an n-gram with the eval/benchmark files of data.quality.decontaminate."""
    from dsft.config import DataConfig
    from dsft.data.decontam import ContaminationCheck, ngram_set
    from dsft.data.load import load_records

    q = ctx.d.quality
    ev_records, _, _ = load_records(DataConfig(path=list(q.decontaminate), encoding=ctx.d.encoding, label_field=None))
    hashes = ngram_set([record_text(r) for r in ev_records], q.decontam_ngram)
    check = ContaminationCheck(hashes, q.decontam_ngram)
    what = f"{q.decontam_ngram}-grams with {', '.join(q.decontaminate)}"

    def verdicts(start: int, chunk: list[dict]) -> list[Verdict]:
        hits = ctx.map_each(check, [record_text(r) for r in chunk])
        return [("contaminated", f"shares {int(h)} {what}") if h else None for h in hits]

    n = len(store)
    store = filter_store(store, ctx, "decontaminate", verdicts)
    ctx.extra["decontamination"] = {"eval_records": len(ev_records), "eval_ngrams": int(hashes.size),
                                    "ngram": q.decontam_ngram, "removed": n - len(store)}
    return store
