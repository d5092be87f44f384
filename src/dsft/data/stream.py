"""The data stage for inputs larger than memory (`data.streaming: true`): three passes over the files, keeping per
record only a dedup key, its LSH band hashes and its label — never the records themselves."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from dsft.config import Config
from dsft.data.minhash import (
    ShingleBatch,
    _digest,
    _exact_jaccard,
    band_hashes,
    cluster,
    optimal_bands,
    pairs_from_band_hashes,
    shingle,
    sorted_unique,
)
from dsft.data.readers import iter_rows, resolve_path
from dsft.data.schema import Invalid, check_mapping, detect_schema, record_text, seed_mapping, to_record
from dsft.data.text import normalize
from dsft.errors import DataError
from dsft.run import RunDir, atomic_write_json, atomic_write_text


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while True:
        b = list(itertools.islice(it, n))
        if not b:
            return
        yield b


def _bands(nd) -> tuple[int, int]:
    if nd.bands is None and nd.rows is None:
        return optimal_bands(nd.threshold, nd.num_perm)
    bands, rows = nd.bands or nd.num_perm // nd.rows, nd.rows or nd.num_perm // nd.bands
    if bands * rows > nd.num_perm:
        raise DataError(f"data.near_dedup: bands×rows = {bands}×{rows} exceeds num_perm {nd.num_perm}")
    return bands, rows


def _read_lines(path, wanted: set[int]) -> dict[int, dict]:
    """The records at the given positions of a JSONL work file (one pass)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i in wanted:
                out[i] = json.loads(line)
    return out


def prepare_streaming(cfg: Config, run: RunDir, out_dir, engine, timer) -> dict[str, Any]:
    """Streaming prepare: pass 1 reads, validates, filters and exact-dedups batch by batch into a work file while
    keeping LSH band hashes; pass 2 verifies near-duplicate candidates; pass 3 splits (shuffle buffer + running
    stratified assignment), balances, augments, derives and writes. Accounting and outputs as the in-memory path."""
    from dsft.data.prepare import FORMAT_TO_SCHEMA, _rejected_row, derive_label_records

    d = cfg.data
    if d.max_samples:
        raise DataError("data.max_samples is not supported with data.streaming: true (sample the file first)")
    q = d.quality
    qf = None
    if q.enabled:
        from dsft.data.quality import QualityFilter

        qf = QualityFilter(q.model_dump())
    contam = None
    if q.enabled and q.decontaminate:
        from dsft.config import DataConfig
        from dsft.data.decontam import ContaminationCheck, ngram_set
        from dsft.data.prepare import load_records

        ev_records, _, _ = load_records(DataConfig(path=list(q.decontaminate), encoding=d.encoding, label_field=None))
        contam = ContaminationCheck(ngram_set([record_text(r) for r in ev_records], q.decontam_ngram), q.decontam_ngram)
    nd = d.near_dedup
    nd_fields = nd.fields or list(d.dedup_fields)
    bands, rows = _bands(nd)
    paths = d.path if isinstance(d.path, list) else [d.path]
    work_path = out_dir / ".work.jsonl"
    dropped: Counter[str] = Counter()
    labels_before: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    duplicates: list[dict] = []
    keys: dict[bytes, tuple[int, str]] = {}
    ids: list[str] = []
    labels: list[str | None] = []
    surv_pos: list[int] = []
    bh_parts: list[np.ndarray] = []
    infos: list[dict] = []
    n_input = pos = 0
    rej = open(out_dir / "rejected.jsonl", "w", encoding="utf-8")

    def reject(row: dict) -> None:
        rej.write(json.dumps(row, ensure_ascii=False) + "\n")

    try:
        with open(work_path, "w", encoding="utf-8") as work:
            for spec in paths:
                path = resolve_path(spec)
                display = spec if spec.startswith("embedded:") else str(path)
                it, info = iter_rows(path, d.encoding, display)
                head = list(itertools.islice(it, 50))
                columns = dict(d.columns)
                keys_seen = info.get("header") or sorted({k for r in head if isinstance(r.data, dict) for k in r.data})
                check_mapping(columns, keys_seen, display)
                if not head:
                    info.update(schema=None, rows=0, valid=0)
                    infos.append(info)
                    continue
                schema = FORMAT_TO_SCHEMA.get(d.format) or detect_schema(head, columns, display, info.get("header"))
                mapping = seed_mapping(keys_seen, columns) if schema == "seed" else columns
                if schema == "seed" and "answer" not in mapping:
                    raise DataError(f"{display}:1: no answer column; map it with data.columns.answer")
                n_rows = n_ok = 0
                for batch in _chunks(itertools.chain(head, it), d.batch_size):
                    recs = []
                    for row in batch:
                        n_rows += 1
                        try:
                            rec = to_record(row, schema, mapping, d.label_field, d.system_prompt, d.tools_in_system)
                        except Invalid as bad:
                            if d.strict:
                                raise DataError(f"{row.file}:{row.line}: {bad.reason}: {bad.detail} (--strict)") from None
                            dropped[bad.reason] += 1
                            reject({"file": row.file, "line": row.line, "reason": bad.reason, "detail": bad.detail,
                                    "data": row.data})
                            continue
                        recs.append(rec)
                        labels_before[str(rec.get("label"))] += 1
                    n_ok += len(recs)
                    if qf is not None and recs:
                        results = [x for part in engine.map_batches(qf, recs, d.batch_size) for x in part]
                        kept = []
                        for (new, reason, detail, p), rec in zip(results, recs, strict=True):
                            pii.update(p)
                            if new is None:
                                dropped[reason] += 1
                                reject(_rejected_row(rec, reason, detail))
                            else:
                                kept.append(new)
                        recs = kept
                        if recs and (q.min_tokens or q.max_tokens):
                            from dsft.data.quality import token_filter
                            from dsft.data.tokens import tokenizer_for

                            verdicts = token_filter(recs, q.model_dump(), tokenizer_for(cfg))
                            for rec, v in zip(recs, verdicts, strict=True):
                                if v is not None:
                                    dropped[v[0]] += 1
                                    reject(_rejected_row(rec, v[0], v[1]))
                            recs = [r for r, v in zip(recs, verdicts, strict=True) if v is None]
                    if contam is not None and recs:
                        hits = contam([record_text(r) for r in recs]).tolist()
                        for rec, h in zip(recs, hits, strict=True):
                            if h:
                                dropped["contaminated"] += 1
                                reject(_rejected_row(rec, "contaminated", f"shares {h} {q.decontam_ngram}-grams with "
                                                                          f"{', '.join(q.decontaminate)}"))
                        recs = [r for r, h in zip(recs, hits, strict=True) if not h]
                    surv = []
                    for rec in recs:
                        key = hashlib.blake2b(normalize(record_text(rec, list(d.dedup_fields))).encode("utf-8"),
                                              digest_size=16).digest()
                        if d.dedup_exact and key in keys:
                            jp, jid = keys[key]
                            duplicates.append({"index": pos, "duplicate_of": jp, "jaccard": 1.0, "method": "exact",
                                               "id": rec["id"], "duplicate_of_id": jid})
                            dropped["duplicate_exact"] += 1
                        else:
                            if d.dedup_exact:
                                keys[key] = (pos, rec["id"])
                            surv.append(rec)
                            surv_pos.append(pos)
                        pos += 1
                    if nd.enabled and surv:
                        tok, counts = ShingleBatch(nd.ngram, nd.word_ngram)([record_text(r, nd_fields) for r in surv])
                        bh = (np.uint64(1) << np.uint64(63)) + np.arange(len(ids), len(ids) + len(surv), dtype=np.uint64)
                        bh = np.repeat(bh[:, None], bands, axis=1)  # empty texts: unique hashes, never a candidate
                        nz = np.flatnonzero(counts > 0)
                        if nz.size:
                            off = np.concatenate([[0], np.cumsum(counts[nz])]).astype(np.uint64)
                            sig = np.asarray(_digest(tok, off, nd.num_perm, nd.seed).to_rows(), dtype=np.uint32)
                            bh[nz] = band_hashes(sig, bands, rows)
                        bh_parts.append(bh)
                    for rec in surv:
                        work.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        ids.append(rec["id"])
                        labels.append(rec.get("label"))
                info.update(schema=schema, mapping=mapping, rows=n_rows, valid=n_ok)
                infos.append(info)
                n_input += n_rows
        timer.step("pass1_read_filter_dedup_exact")
        if n_input == 0:
            raise DataError(f"{', '.join(i['file'] for i in infos)}: no records (empty dataset)")

        # pass 2: near-duplicates among the survivors, verified on the candidates' shingles only
        n = len(ids)
        removed: dict[int, dict] = {}
        nd_stats: dict[str, Any] = {}
        if nd.enabled and n > 1:
            pairs = pairs_from_band_hashes(np.concatenate(bh_parts))
            nd_stats = {"bands": bands, "rows": rows, "num_perm": nd.num_perm, "threshold": nd.threshold, "ngram": nd.ngram,
                        "verify": nd.verify, "fields": nd_fields, "candidate_pairs": int(len(pairs))}
            if len(pairs):
                cand = sorted_unique(pairs.ravel())
                got = _read_lines(work_path, set(cand.tolist()))
                texts = [record_text(got[int(i)], nd_fields) for i in cand.tolist()]
                tok, counts = shingle(texts, nd.ngram, nd.word_ngram)
                off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                lp = np.searchsorted(cand, pairs)
                if nd.verify == "exact":
                    jac = _exact_jaccard(tok, off, lp)

                    def jaccard_of(p: np.ndarray) -> list[float]:
                        return _exact_jaccard(tok, off, p).tolist()
                else:
                    sig = np.asarray(_digest(tok, off.astype(np.uint64), nd.num_perm, nd.seed).to_rows(), dtype=np.uint32)
                    jac = (sig[lp[:, 0]] == sig[lp[:, 1]]).mean(axis=1) if nd.verify == "minhash" else np.ones(len(lp))

                    def jaccard_of(p: np.ndarray) -> list[float]:
                        return [float((sig[a] == sig[b]).mean()) for a, b in p.tolist()]
                ok = jac >= nd.threshold if nd.verify != "none" else np.ones(len(lp), dtype=bool)
                nd_stats["candidates"] = int(cand.size)
                nd_stats["pairs"] = int(ok.sum())
                for x in cluster(lp[ok], jac[ok], jaccard_of):
                    gi, gr = int(cand[x["index"]]), int(cand[x["duplicate_of"]])
                    row = {"index": surv_pos[gi], "duplicate_of": surv_pos[gr], "jaccard": x["jaccard"], "method": "minhash",
                           "id": ids[gi], "duplicate_of_id": ids[gr]}
                    if "matched" in x:
                        row.update(matched_id=ids[int(cand[x["matched"]])], matched_jaccard=x["matched_jaccard"])
                    removed[gi] = row
            gone = {r["index"]: r for r in removed.values()}
            same_fields = nd_fields == list(d.dedup_fields)
            for x in duplicates:
                if x["duplicate_of"] in gone:
                    g = gone[x["duplicate_of"]]
                    x.update(via=x["duplicate_of_id"], duplicate_of=g["duplicate_of"], duplicate_of_id=g["duplicate_of_id"],
                             jaccard=g["jaccard"] if same_fields else None)
            duplicates += sorted(removed.values(), key=lambda r: r["index"])
            if removed:
                dropped["near_duplicate"] += len(removed)
            nd_stats["removed"] = len(removed)
        timer.step("pass2_dedup_near")

        # pass 3: split (simulated shuffle buffer over indices), balance, augment, derive, write
        alive = [i for i in range(n) if i not in removed]
        if not alive:
            raise DataError(f"{', '.join(i['file'] for i in infos)}: no record left after validation, filters and dedup "
                            f"(dropped: {dict(dropped)}); see {out_dir / 'rejected.jsonl'}")
        from dsft.data.split import stream_split

        where = {item["i"]: split for split, item in
                 stream_split(({"i": i, "label": labels[i]} for i in alive), d.test_size, d.eval_size, d.seed, d.shuffle_buffer)}
        under: set[int] = set()
        copies: Counter[int] = Counter()
        balance_info: dict[str, Any] = {}
        if d.balance.method != "none":
            from dsft.data.balance import target_counts

            if d.balance.method in ("cap", "cap_floor") and d.balance.cap is None:
                raise DataError("data.balance.cap must be set for method cap/cap_floor")
            if d.balance.method in ("floor", "cap_floor") and d.balance.floor is None:
                raise DataError("data.balance.floor must be set for method floor/cap_floor")
            groups: dict[str, list[int]] = {}
            for i in alive:
                if where[i] == "train" and labels[i]:
                    groups.setdefault(str(labels[i]), []).append(i)
            before = {k: len(v) for k, v in groups.items()}
            target = target_counts(before, d.balance.method, d.balance.cap, d.balance.floor, d.balance.temperature)
            for lab in sorted(groups):  # the same choices as balance.balance makes in memory
                idx = groups[lab]
                rng = random.Random(f"{d.seed}:balance:{lab}")
                t = target[lab]
                if t <= len(idx):
                    under |= set(idx) - set(rng.sample(idx, t))
                else:
                    reps = t - len(idx)
                    picks = [idx[k % len(idx)] for k in range(reps)] if reps >= len(idx) else []
                    rest = reps - len(picks)
                    picks += sorted(rng.sample(idx, rest)) if rest else []
                    copies.update(picks)
            after = Counter()
            for lab, idx in groups.items():
                after[lab] = sum(1 for i in idx if i not in under) + sum(copies[i] for i in idx)
            balance_info = {"method": d.balance.method, "before": dict(sorted(before.items())),
                            "after": dict(sorted(after.items())), "oversampled": sum(copies.values()),
                            "undersampled": len(under)}
        if under:
            dropped["balance_undersampled"] += len(under)
        alive_set = set(alive)
        n_split = Counter()
        lab_counts: dict[str, Counter] = {"train": Counter(), "test": Counter(), "eval": Counter()}
        composition: Counter[str] = Counter()
        chars: dict[str, list[int]] = {"question": [], "context": [], "answer": [], "conversation": []}
        final_for_tokens: list[dict] = []
        token_lists: dict[str, list[int]] | None = {}
        augment_info: dict[str, Any] = {"made": Counter()}
        derive = bool(d.label_prompt and d.label_task_in_train and d.label_field)
        handles = {s: open(out_dir / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "test", "eval")}

        def emit(split: str, rec: dict) -> None:
            recs = derive_label_records([rec], d.label_prompt, d.system_prompt) if split == "train" and derive else [rec]
            for r in recs:
                handles[split].write(json.dumps(r, ensure_ascii=False) + "\n")
                if split == "train":
                    composition[r["provenance"]] += 1
            if split == "train" and rec["provenance"] != "derived:label_task":
                lab_counts["train"][str(rec.get("label"))] += 1
            n_split[split] += 1

        def flush_tokens() -> None:
            nonlocal token_lists
            if token_lists is None or not final_for_tokens:
                final_for_tokens.clear()
                return
            try:
                from dsft.data.prepare import record_token_lengths

                for k, v in record_token_lengths(cfg, final_for_tokens).items():
                    token_lists.setdefault(k, []).extend(v)
            except Exception:  # no tokenizer: the report says so
                token_lists = None
            final_for_tokens.clear()

        try:
            with open(work_path, encoding="utf-8") as fh:
                for batch in _chunks(enumerate(fh), d.batch_size):
                    train_batch = []
                    for i, line in batch:
                        if i not in alive_set:
                            continue
                        rec = json.loads(line)
                        split = where[i]
                        if i in under:
                            reject(_rejected_row(rec, "balance_undersampled",
                                                 f"class '{rec.get('label')}' undersampled to {d.balance.method} target"))
                            continue
                        if split != "train":
                            lab_counts[split][str(rec.get("label"))] += 1
                        emit(split, rec)
                        for k in range(copies[i]):
                            emit("train", {**rec, "id": f"{rec['id']}#os{k + 1}", "provenance": "oversampled"})
                        if split == "train":
                            train_batch.append(rec)
                        f = rec.get("fields") or {}
                        for k in ("question", "context", "answer"):
                            if f.get(k):
                                chars[k].append(len(f[k]))
                        chars["conversation"].append(sum(len(m["content"]) for m in rec["messages"]))
                        final_for_tokens.append(rec)
                    if d.augment.methods and d.augment.ratio > 0 and train_batch:
                        from dsft.data.augment import augment_records

                        new, info = augment_records(train_batch, d.augment, seed=d.seed, engine=engine,
                                                    batch_size=d.batch_size)
                        augment_info["made"].update(info["made"])
                        for r in new:
                            emit("train", r)
                    flush_tokens()
        finally:
            for h in handles.values():
                h.close()
        timer.step("pass3_split_write")
    finally:
        rej.close()
        if work_path.exists():
            work_path.unlink()
    with open(out_dir / "duplicates.jsonl", "w", encoding="utf-8") as fh:
        for x in duplicates:
            fh.write(json.dumps(x, ensure_ascii=False) + "\n")

    kept = len(alive) - len(under)
    if n_input != kept + sum(dropped.values()):  # pragma: no cover - an invariant, never expected
        raise DataError(f"internal accounting error: input {n_input} ≠ kept {kept} + dropped {dict(dropped)}")
    train_total = sum(v for k, v in composition.items() if k != "derived:label_task")
    counts = {"input": n_input, "kept": kept, "dropped": dict(sorted(dropped.items())), "train": train_total,
              "test": n_split["test"], "eval": n_split["eval"], "derived": composition.get("derived:label_task", 0)}
    final_labels = Counter(str(labels[i]) for i in alive if i not in under)
    report: dict[str, Any] = {
        "counts": counts,
        "accounting_holds": True,
        "engine": engine.name,
        "streaming": True,
        "files": infos,
        "label_field": d.label_field,
        "train_composition": dict(sorted(composition.items())),
        "labels": {"before": dict(sorted(labels_before.items())),
                   "after": dict(sorted(Counter(str(labels[i]) for i in alive).items())),
                   "train": dict(sorted(lab_counts["train"].items())),
                   "test": dict(sorted(lab_counts["test"].items())),
                   "eval": dict(sorted(lab_counts["eval"].items()))},
        "pii": dict(sorted(pii.items())),
    }
    if nd_stats:
        report["near_dedup"] = nd_stats
    if balance_info:
        report["balance"] = balance_info
    if d.augment.methods and d.augment.ratio > 0:
        report["augment"] = {"methods": list(d.augment.methods), "ratio": d.augment.ratio, "made": dict(augment_info["made"])}
    from dsft.data.prepare import _lengths_and_plots
    from dsft.data.report import render_md

    _lengths_and_plots(report, cfg, [], out_dir, lengths=({k: v for k, v in chars.items() if v}, token_lists))
    timer.step("report")
    report["timings_s"] = timer.t
    atomic_write_json(out_dir / "data_report.json", report)
    atomic_write_text(out_dir / "data_report.md", render_md(report))
    manifest = {"train": "train.jsonl", "test": "test.jsonl", "eval": "eval.jsonl", "report": "data_report.json",
                "counts": counts, "labels": sorted(k for k in final_labels if k != "None"), "label_field": d.label_field}
    run.write_manifest("data", manifest)
    return manifest
