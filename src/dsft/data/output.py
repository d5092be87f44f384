"""Last step of the data pipeline: split, balance, augment, derive the label task, write train/test/eval.jsonl."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsft.data.context import StageContext
from dsft.data.store import CHUNK_BATCHES, JsonlWriter, Store
from dsft.errors import DataError
from dsft.records import label_prompt_messages

SPLITS = ("train", "test", "eval")
DERIVED = "derived:label_task"


def derived_label_record(rec: dict, label_prompt: str, system_prompt: str | None) -> dict:
    """The classification conversation derived from a labelled record (its label as the assistant turn)."""
    msgs = label_prompt_messages(rec, label_prompt, system_prompt)
    return {**rec, "id": f"{rec['id']}#label", "messages": [*msgs, {"role": "assistant", "content": rec["label"]}],
            "provenance": DERIVED}


def derive_label_records(train: list[dict], label_prompt: str, system_prompt: str | None) -> list[dict]:
    """train + one classification conversation per labelled record, interleaved. Augmented and oversampled records
    get theirs too (a reworded question is a new classification example)."""
    out = []
    for r in train:
        out.append(r)
        if r.get("label") and r.get("provenance") != DERIVED:
            out.append(derived_label_record(r, label_prompt, system_prompt))
    return out


@dataclass
class SplitSummary:
    """What the writer saw: counts per split, label distributions, train provenance, lengths of the kept records."""

    n_train: int = 0
    derived: int = 0
    sizes: Counter[str] = field(default_factory=Counter)
    labels: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    labels_after: Counter[str] = field(default_factory=Counter)
    composition: Counter[str] = field(default_factory=Counter)
    final_labels: set[str] = field(default_factory=set)  # labels of the original records written
    chars: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in ("question", "context", "answer", "conversation")})
    tokens: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in ("question", "answer", "conversation")})
    token_error: str | None = None

    @property
    def kept(self) -> int:
        """Original records in the outputs (train originals + test + eval)."""
        return self.sizes["train_original"] + self.sizes["test"] + self.sizes["eval"]


class SplitWriter:
    """Writes records to train/test/eval.jsonl (each train record followed by its derived label record)."""

    def __init__(self, ctx: StageContext):
        d = ctx.d
        self.ctx, self.summary = ctx, SplitSummary()
        self.derive = bool(d.label_prompt and d.label_task_in_train and d.label_field)
        self.files = {s: JsonlWriter(ctx.out_dir / f"{s}.jsonl") for s in SPLITS}

    def emit(self, split: str, rec: dict) -> None:
        s = self.summary
        self.files[split].write(rec)
        if rec.get("label") and rec["provenance"] == "original":
            s.final_labels.add(str(rec["label"]))
        if split != "train":
            s.sizes[split] += 1
            s.labels[split][str(rec.get("label"))] += 1
            return
        s.n_train += 1
        s.sizes["train_original"] += rec["provenance"] == "original"
        s.composition[rec["provenance"]] += 1
        s.labels["train"][str(rec.get("label"))] += 1
        if self.derive and rec.get("label") and rec["provenance"] != DERIVED:
            d = self.ctx.d
            self.files["train"].write(derived_label_record(rec, d.label_prompt, d.system_prompt))
            s.derived += 1
            s.composition[DERIVED] += 1

    def measure(self, final: list[dict]) -> None:
        """Lengths in characters (and tokens, while a tokenizer is at hand) of kept original records."""
        from dsft.data.stats import record_lengths

        s = self.summary
        for k, v in record_lengths(final).items():
            s.chars[k].extend(v)
        if s.token_error is not None or not final:
            return
        try:
            from dsft.data.tokens import record_token_lengths

            for k, v in record_token_lengths(self.ctx.cfg, final).items():
                s.tokens[k].extend(v)
        except Exception as err:  # token counts are a report nicety: never fail the stage for them
            s.token_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"

    def close(self, ok: bool) -> None:
        for w in self.files.values():
            w.close() if ok else w.discard()


def write_splits(store: Store, ctx: StageContext) -> SplitSummary:
    """Assign splits (stratified by label), balance train, write every split in input order, then the
    oversampled copies and the augmented records to train. Memory: one label per record, never the records."""
    d = ctx.d
    from dsft.data.split import assign_splits

    labels = [r.get("label") for _, chunk in store.chunks(d.batch_size) for r in chunk]
    where = assign_splits(labels, d.test_size, d.eval_size, d.seed)
    under, copies = _balance(ctx, labels, where)
    out = SplitWriter(ctx)
    out.summary.labels_after.update(str(x) for x in labels)
    ok = False
    try:
        originals: list[int] = []  # positions of the train records kept (augmentation samples from them)
        for start, chunk in ctx.chunks(store, "split"):
            final = []
            for k, rec in enumerate(chunk):
                i, split = start + k, where[start + k]
                if i in under:
                    ctx.drop(rec, "balance_undersampled", f"class '{rec.get('label')}' undersampled to {d.balance.method} target")
                    continue
                out.emit(split, rec)
                final.append(rec)
                if split == "train":
                    originals.append(i)
            out.measure(final)
        _write_copies(store, ctx, copies, out)
        if d.augment.methods and d.augment.ratio > 0:
            _augment(store, ctx, originals, out)
        ok = True
    finally:
        out.close(ok)
    return out.summary


def _balance(ctx: StageContext, labels: list[str | None], where: list[str]) -> tuple[set[int], list[tuple[int, int]]]:
    """(positions undersampled away, [(position, copy number)] to repeat) for data.balance over the train split."""
    b = ctx.d.balance
    if b.method == "none":
        return set(), []
    from dsft.data.balance import balance_plan

    train = [i for i, s in enumerate(where) if s == "train"]
    try:
        dropped, copies, ctx.extra["balance"] = balance_plan([labels[i] for i in train], b.method, cap=b.cap, floor=b.floor,
                                                             temperature=b.temperature, seed=ctx.d.seed)
    except ValueError as err:
        raise DataError(str(err)) from None
    return {train[t] for t in dropped}, [(train[t], k) for t, k in copies]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_copies(store: Store, ctx: StageContext, copies: list[tuple[int, int]], out: SplitWriter) -> None:
    from dsft.data.balance import oversampled_copy

    for part in _batches(copies, ctx.d.batch_size * CHUNK_BATCHES):
        for (_, k), rec in zip(part, store.get([i for i, _ in part]), strict=True):
            out.emit("train", oversampled_copy(rec, k))


def _augment(store: Store, ctx: StageContext, originals: list[int], out: SplitWriter) -> None:
    """data.augment over the kept original training records, method by method, a chunk at a time."""
    from dsft.data.augment import augment_picks, augmenter

    a, d = ctx.d.augment, ctx.d
    info: dict[str, Any] = {"methods": list(a.methods), "ratio": a.ratio, "made": {}}
    for method in a.methods:
        fn = augmenter(method, a, seed=d.seed, engine=ctx.engine, batch_size=d.batch_size)
        made = 0
        for part in _batches(augment_picks(len(originals), a.ratio, method, d.seed), d.batch_size * CHUNK_BATCHES):
            for rec in fn(store.get([originals[p] for p in part])):
                out.emit("train", rec)
                made += 1
        info["made"][method] = made
    ctx.extra["augment"] = info
