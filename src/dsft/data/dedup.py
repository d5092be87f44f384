"""Dedup steps of the data pipeline: exact (normalised text) and MinHash + LSH near-duplicates; duplicates.jsonl rows."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dsft.data.context import StageContext
from dsft.data.schema import record_text
from dsft.data.store import Store
from dsft.data.text import normalize
from dsft.errors import DataError


def dedup_key(rec: dict, fields: list[str]) -> bytes:
    """What exact dedup compares: a 16-byte hash of the record's normalised text."""
    return hashlib.blake2b(normalize(record_text(rec, fields)).encode("utf-8"), digest_size=16).digest()


def exact_dedup(records: list[dict], fields: list[str]) -> tuple[list[dict], list[dict]]:
    """Keep the first record of each normalised-text key; returns (kept, duplicates rows with local indices)."""
    seen: dict[bytes, int] = {}
    kept, dups = [], []
    for i, rec in enumerate(records):
        key = dedup_key(rec, fields)
        if key in seen:
            j = seen[key]
            dups.append({"index": i, "duplicate_of": j, "jaccard": 1.0, "method": "exact",
                         "id": rec["id"], "duplicate_of_id": records[j]["id"]})
        else:
            seen[key] = i
            kept.append(rec)
    return kept, dups


def exact_dedup_step(store: Store, ctx: StageContext) -> tuple[Store, list[int]]:
    """Drop exact duplicates; their rows go to ctx.duplicates (index / duplicate_of: positions among the records
    that entered dedup). Returns the kept records and their positions. State: one 16-byte key per kept record."""
    fields = list(ctx.d.dedup_fields)
    seen: dict[bytes, tuple[int, str]] = {}
    keep: list[int] = []
    for start, chunk in ctx.chunks(store, "dedup_exact"):
        for k, rec in enumerate(chunk):
            i, key = start + k, dedup_key(rec, fields)
            if key in seen:
                j, jid = seen[key]
                ctx.duplicates.append({"index": i, "duplicate_of": j, "jaccard": 1.0, "method": "exact",
                                       "id": rec["id"], "duplicate_of_id": jid})
            else:
                seen[key] = (i, rec["id"])
                keep.append(i)
    ctx.count_dropped("duplicate_exact", len(store) - len(keep))
    return store.select(keep), keep


def near_dedup_step(store: Store, ctx: StageContext, positions: list[int]) -> Store:
    """Drop MinHash near-duplicates: LSH band hashes batch by batch (on the engine), candidate pairs, exact-Jaccard
    verification of the candidates' texts only, connected components keeping the lowest index.
    positions: each record's position among the records that entered dedup (for duplicates.jsonl)."""
    import numpy as np

    from dsft.data.minhash import BandHashBatch, cluster_candidates, pairs_from_band_hashes, resolve_bands

    nd = ctx.d.near_dedup
    fields = nd.fields or list(ctx.d.dedup_fields)
    try:
        bands, rows = resolve_bands(nd.threshold, nd.num_perm, nd.bands, nd.rows)
    except ValueError as err:
        raise DataError(f"data.near_dedup: {err}") from None
    step = BandHashBatch(nd.ngram, nd.word_ngram, nd.num_perm, nd.seed, bands, rows)
    parts, counts = [], []
    for _, chunk in ctx.chunks(store, "dedup_near"):
        for bh, n_shingles in ctx.map_parts(step, [record_text(r, fields) for r in chunk]):
            parts.append(bh)
            counts.append(n_shingles)
    bh, n_shingles = np.concatenate(parts), np.concatenate(counts)
    empty = np.flatnonzero(n_shingles == 0)  # no shingles: a unique value per band, never a candidate
    bh[empty] = ((np.uint64(1) << np.uint64(63)) + empty.astype(np.uint64))[:, None]
    found, stats = cluster_candidates(
        pairs_from_band_hashes(bh), lambda idx: [record_text(r, fields) for r in store.get(idx)],
        threshold=nd.threshold, verify=nd.verify, ngram=nd.ngram, word_ngram=nd.word_ngram, num_perm=nd.num_perm,
        seed=nd.seed)
    rows_, examples = _duplicate_rows(store, found, positions, fields)
    _point_exact_at_kept(ctx, rows_, same_fields=fields == list(ctx.d.dedup_fields))
    ctx.duplicates += rows_
    ctx.count_dropped("near_duplicate", len(rows_))
    ctx.extra["near_dedup"] = {"bands": bands, "rows": rows, "num_perm": nd.num_perm, "threshold": nd.threshold,
                               "ngram": nd.ngram, "docs": len(store), "shingles": int(n_shingles.sum()), **stats,
                               "removed": len(rows_), "verify": nd.verify, "fields": fields, "examples": examples}
    gone = {x["index"] for x in found}
    return store.select([i for i in range(len(store)) if i not in gone])


def _duplicate_rows(store: Store, found: list[dict], positions: list[int], fields: list[str]
                    ) -> tuple[list[dict], list[dict]]:
    """duplicates.jsonl rows (positions and ids) of the near-duplicates found, and the 3 least similar as examples."""
    need = sorted({x[k] for x in found for k in ("index", "duplicate_of", "matched") if k in x})
    recs = dict(zip(need, store.get(need), strict=True))
    rows: list[dict[str, Any]] = []
    for x in found:
        row = {"index": positions[x["index"]], "duplicate_of": positions[x["duplicate_of"]], "jaccard": x["jaccard"],
               "method": "minhash", "id": recs[x["index"]]["id"], "duplicate_of_id": recs[x["duplicate_of"]]["id"]}
        if "matched" in x:
            row.update(matched_id=recs[x["matched"]]["id"], matched_jaccard=x["matched_jaccard"])
        rows.append(row)
    examples = [{"id": recs[x["index"]]["id"], "duplicate_of_id": recs[x["duplicate_of"]]["id"], "jaccard": x["jaccard"],
                 "text": record_text(recs[x["index"]], fields), "partner_text": record_text(recs[x["duplicate_of"]], fields)}
                for x in sorted(found, key=lambda x: x["jaccard"])[:3]]
    return rows, examples


def _point_exact_at_kept(ctx: StageContext, near_rows: list[dict], *, same_fields: bool) -> None:
    """An exact duplicate whose partner then fell as a near-duplicate points at the record that was kept."""
    gone = {x["index"]: x for x in near_rows}
    for x in ctx.duplicates:
        if x["duplicate_of"] in gone:
            g = gone[x["duplicate_of"]]
            x.update(via=x["duplicate_of_id"], duplicate_of=g["duplicate_of"], duplicate_of_id=g["duplicate_of_id"],
                     jaccard=g["jaccard"] if same_fields else None)


def dedup_files(inputs: list[str], output: Path, duplicates: Path | None = None, *, threshold: float = 0.8,
                fields: list[str] | None = None, ngram: int = 5, word_ngram: int = 3, num_perm: int = 128,
                bands: int | None = None, verify: str = "exact", encoding: str = "auto", force: bool = False) -> dict[str, Any]:
    """`dsft data dedup`: near-duplicate removal of whole files → OUTPUT (kept records) and the duplicates listed
    with their partners. Returns a summary for printing."""
    import time

    from dsft.config import DataConfig
    from dsft.data.load import load_records, require_records
    from dsft.data.minhash import near_dedup
    from dsft.errors import OverwriteError
    from dsft.run import write_jsonl

    dup_path = duplicates or output.with_name(output.stem + ".duplicates.jsonl")
    for p in (output, dup_path):
        if p.exists() and not force:
            raise OverwriteError(f"{p} exists; pass --force to overwrite it")
    if not 0 < threshold < 1:
        raise DataError(f"--threshold {threshold}: expected a Jaccard similarity between 0 and 1")
    t0 = time.perf_counter()
    records, rejected, infos = load_records(DataConfig(path=list(inputs), encoding=encoding, label_field=None))
    require_records(len(records) + len(rejected), infos)
    texts = [record_text(r, fields or ["question", "answer"]) for r in records]
    try:
        res = near_dedup(texts, threshold=threshold, num_perm=num_perm, ngram=ngram, word_ngram=word_ngram,
                         bands=bands, rows=(num_perm // bands) if bands else None, verify=verify)
    except ValueError as err:
        raise DataError(str(err)) from None
    kept = [r for r, k in zip(records, res.keep.tolist(), strict=True) if k]
    dups = [{**d, "id": records[d["index"]]["id"], "duplicate_of_id": records[d["duplicate_of"]]["id"],
             **({"matched_id": records[d["matched"]]["id"]} if "matched" in d else {})} for d in res.duplicates]
    write_jsonl(output, kept)
    write_jsonl(dup_path, dups)
    return {"records": len(records), "invalid": len(rejected), "kept": len(kept), "removed": len(dups),
            "seconds": time.perf_counter() - t0, "stats": res.stats, "output": output, "duplicates": dup_path}
