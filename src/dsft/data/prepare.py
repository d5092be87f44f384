"""`dsft.data.prepare`: read → validate → filter → dedup → decontaminate → split → balance → augment → derive → write."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from typing import Any

from dsft.config import Config
from dsft.data.engine import get_engine
from dsft.data.readers import read_rows, resolve_path
from dsft.data.schema import Invalid, check_mapping, detect_schema, record_text, seed_mapping, to_record
from dsft.data.split import stratified_split
from dsft.data.text import normalize
from dsft.errors import DataError
from dsft.records import label_prompt_messages
from dsft.run import RunDir, atomic_write_json, atomic_write_text, write_jsonl

log = logging.getLogger("dsft.data")
FORMAT_TO_SCHEMA = {"csv": "seed", "seed": "seed", "alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "openai", "text": "text"}

__all__ = ["prepare", "load_records", "exact_dedup", "stratified_split", "derive_label_records"]


class Timer:
    """Per-step wall-clock timings for the report."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.last = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.t[name] = round(self.t.get(name, 0.0) + now - self.last, 4)
        self.last = now


def load_records(cfg_data, *, strict: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """Read every configured file → (records, rejected rows, per-file info). strict: raise on the first bad row."""
    paths = cfg_data.path if isinstance(cfg_data.path, list) else [cfg_data.path]
    if not paths:
        raise DataError("data.path: no input file given")
    records: list[dict] = []
    rejected: list[dict] = []
    infos: list[dict] = []
    for spec in paths:
        path = resolve_path(spec)
        display = spec if spec.startswith("embedded:") else str(path)
        rows, info = read_rows(path, cfg_data.encoding, display=display)
        columns = dict(cfg_data.columns)
        if info.get("header"):
            check_mapping(columns, info["header"], display)
        elif columns and rows:
            seen: set[str] = set()
            for r in rows:
                if isinstance(r.data, dict):
                    seen |= set(r.data)
            check_mapping(columns, seen, display)
        if not rows:
            info["schema"] = None
            infos.append(info)
            continue
        schema = FORMAT_TO_SCHEMA.get(cfg_data.format) or detect_schema(rows, columns, display, info.get("header"))
        keys = info.get("header") or sorted({k for r in rows[:50] if isinstance(r.data, dict) for k in r.data})
        mapping = seed_mapping(keys, columns) if schema == "seed" else columns
        if schema == "seed" and "answer" not in mapping:
            raise DataError(f"{display}:1: no answer column (looked for answer, response, reply); "
                            f"map it with data.columns.answer; the file has: {', '.join(keys)}")
        info.update(schema=schema, mapping=mapping)
        n_ok = 0
        for row in rows:
            try:
                records.append(to_record(row, schema, mapping, cfg_data.label_field, cfg_data.system_prompt,
                                         cfg_data.tools_in_system))
                n_ok += 1
            except Invalid as bad:
                if strict:
                    raise DataError(f"{row.file}:{row.line}: {bad.reason}: {bad.detail} (--strict)") from None
                rejected.append({"file": row.file, "line": row.line, "reason": bad.reason, "detail": bad.detail,
                                 "data": row.data})
        info["valid"] = n_ok
        infos.append(info)
    return records, rejected, infos


def exact_dedup(records: list[dict], fields: list[str]) -> tuple[list[dict], list[dict]]:
    """Keep the first record of each normalised-text key; returns (kept, duplicates rows with local indices)."""
    seen: dict[bytes, int] = {}
    kept, dups = [], []
    for i, rec in enumerate(records):
        key = hashlib.blake2b(normalize(record_text(rec, fields)).encode("utf-8"), digest_size=16).digest()
        if key in seen:
            j = seen[key]
            dups.append({"index": i, "duplicate_of": j, "jaccard": 1.0, "method": "exact",
                         "id": rec["id"], "duplicate_of_id": records[j]["id"]})
        else:
            seen[key] = i
            kept.append(rec)
    return kept, dups


def derive_label_records(train: list[dict], label_prompt: str, system_prompt: str | None) -> list[dict]:
    """train + one classification conversation per labelled record (label as the assistant turn), interleaved.
    Augmented and oversampled records get theirs too (a reworded question is a new classification example)."""
    out = []
    for r in train:
        out.append(r)
        if r.get("label") and r.get("provenance") != "derived:label_task":
            msgs = label_prompt_messages(r, label_prompt, system_prompt)
            out.append({**r, "id": f"{r['id']}#label", "messages": [*msgs, {"role": "assistant", "content": r["label"]}],
                        "provenance": "derived:label_task"})
    return out


def _rejected_row(rec: dict, reason: str, detail: str | None) -> dict:
    return {"file": rec["source"]["file"], "line": rec["source"]["line"], "id": rec["id"], "reason": reason,
            "detail": detail, "record": rec}


def _quality(records: list[dict], cfg: Config, engine, dropped: Counter, rejected: list[dict],
             pii_counts: Counter) -> list[dict]:
    """The quality filters (policy, not validity: --strict does not stop on them); drops go to rejected.jsonl."""
    from dsft.data.quality import QualityFilter, token_filter

    q = cfg.data.quality.model_dump()
    results = [x for part in engine.map_batches(QualityFilter(q), records, cfg.data.batch_size) for x in part]
    kept = []
    for (new, reason, detail, pii), rec in zip(results, records, strict=True):
        pii_counts.update(pii)
        if new is None:
            dropped[reason] += 1
            rejected.append(_rejected_row(rec, reason, detail))
        else:
            kept.append(new)
    if q["min_tokens"] or q["max_tokens"]:
        from dsft.data.tokens import tokenizer_for

        verdicts = token_filter(kept, q, tokenizer_for(cfg))
        out = []
        for rec, v in zip(kept, verdicts, strict=True):
            if v is None:
                out.append(rec)
            else:
                dropped[v[0]] += 1
                rejected.append(_rejected_row(rec, v[0], v[1]))
        kept = out
    return kept


def _near_dedup(records: list[dict], cfg: Config, engine, positions: list[int]) -> tuple[list[dict], list[dict], dict]:
    from dsft.data.minhash import ShingleBatch, concat_shingles, near_dedup

    nd = cfg.data.near_dedup
    fields = nd.fields or list(cfg.data.dedup_fields)
    texts = [record_text(r, fields) for r in records]
    sh = concat_shingles(engine.map_batches(ShingleBatch(nd.ngram, nd.word_ngram), texts, cfg.data.batch_size))
    res = near_dedup(texts, threshold=nd.threshold, num_perm=nd.num_perm, ngram=nd.ngram, word_ngram=nd.word_ngram,
                     bands=nd.bands, rows=nd.rows, verify=nd.verify, seed=nd.seed, shingles=sh)
    dups = []
    for x in res.duplicates:
        row = {"index": positions[x["index"]], "duplicate_of": positions[x["duplicate_of"]], "jaccard": x["jaccard"],
               "method": "minhash", "id": records[x["index"]]["id"], "duplicate_of_id": records[x["duplicate_of"]]["id"]}
        if "matched" in x:
            row.update(matched_id=records[x["matched"]]["id"], matched_jaccard=x["matched_jaccard"])
        dups.append(row)
    kept = [r for r, k in zip(records, res.keep.tolist(), strict=True) if k]
    examples = [{"id": records[d["index"]]["id"], "duplicate_of_id": records[d["duplicate_of"]]["id"], "jaccard": d["jaccard"],
                 "text": texts[d["index"]], "partner_text": texts[d["duplicate_of"]]}
                for d in sorted(res.duplicates, key=lambda d: d["jaccard"])[:3]]
    return kept, dups, {**res.stats, "verify": nd.verify, "fields": fields, "examples": examples}


def _decontaminate(records: list[dict], cfg: Config, engine, dropped: Counter, rejected: list[dict]) -> tuple[list[dict], dict]:
    from dsft.config import DataConfig
    from dsft.data.decontam import ContaminationCheck, ngram_set

    q = cfg.data.quality
    ev_cfg = DataConfig(path=list(q.decontaminate), encoding=cfg.data.encoding, label_field=None)
    ev_records, _, _ = load_records(ev_cfg)
    ev_texts = [record_text(r) for r in ev_records]
    hashes = ngram_set(ev_texts, q.decontam_ngram)
    hits = [int(x) for part in engine.map_batches(ContaminationCheck(hashes, q.decontam_ngram),
                                                  [record_text(r) for r in records], cfg.data.batch_size)
            for x in part]
    kept = []
    for rec, h in zip(records, hits, strict=True):
        if h:
            dropped["contaminated"] += 1
            rejected.append(_rejected_row(rec, "contaminated", f"shares {h} {q.decontam_ngram}-grams with {', '.join(q.decontaminate)}"))
        else:
            kept.append(rec)
    return kept, {"eval_records": len(ev_records), "eval_ngrams": int(hashes.size), "ngram": q.decontam_ngram,
                  "removed": len(records) - len(kept)}


def prepare(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Run the data stage into `<run>/data/`; returns the manifest (see docs/ARCHITECTURE.md)."""
    d = cfg.data
    timer = Timer()
    out_dir = run.prepare_stage("data", force=force)
    engine = get_engine(d.engine, d.workers)
    if d.streaming:  # inputs larger than memory: three passes, constant state per record
        from dsft.data.stream import prepare_streaming

        return prepare_streaming(cfg, run, out_dir, engine, timer)
    records, rejected, infos = load_records(d, strict=d.strict)
    n_input = len(records) + len(rejected)
    if n_input == 0:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no records (empty dataset)")
    dropped: Counter[str] = Counter(r["reason"] for r in rejected)
    labels_before = Counter(str(r.get("label")) for r in records)
    timer.step("read")
    report_extra: dict[str, Any] = {}

    if d.max_samples and len(records) > d.max_samples:
        keep = set(random.Random(d.seed).sample(range(len(records)), d.max_samples))
        for i, r in enumerate(records):
            if i not in keep:
                rejected.append(_rejected_row(r, "max_samples", f"data.max_samples={d.max_samples}"))
        dropped["max_samples"] += len(records) - len(keep)
        records = [r for i, r in enumerate(records) if i in keep]
    pii_counts: Counter[str] = Counter()
    if d.quality.enabled:
        records = _quality(records, cfg, engine, dropped, rejected, pii_counts)
        timer.step("quality")
    # duplicates.jsonl: index / duplicate_of are positions among the records that entered dedup (after the filters)
    duplicates: list[dict] = []
    positions = list(range(len(records)))
    if d.dedup_exact:
        records, dups = exact_dedup(records, list(d.dedup_fields))
        duplicates += dups
        gone = {x["index"] for x in dups}
        positions = [i for i in positions if i not in gone]
        if dups:
            dropped["duplicate_exact"] += len(dups)
        timer.step("dedup_exact")
    if d.near_dedup.enabled and len(records) > 1:
        records, dups, report_extra["near_dedup"] = _near_dedup(records, cfg, engine, positions)
        # an exact duplicate whose partner then fell as a near-duplicate points at the record that was kept
        same_fields = (d.near_dedup.fields or list(d.dedup_fields)) == list(d.dedup_fields)
        gone = {x["index"]: x for x in dups}
        for x in duplicates:
            if x["duplicate_of"] in gone:
                g = gone[x["duplicate_of"]]
                x.update(via=x["duplicate_of_id"], duplicate_of=g["duplicate_of"], duplicate_of_id=g["duplicate_of_id"],
                         jaccard=g["jaccard"] if same_fields else None)
        duplicates += dups
        if dups:
            dropped["near_duplicate"] += len(dups)
        timer.step("dedup_near")
    if d.quality.enabled and d.quality.decontaminate:
        records, report_extra["decontamination"] = _decontaminate(records, cfg, engine, dropped, rejected)
        timer.step("decontaminate")
    if not records:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no record left after validation, filters and dedup "
                        f"(dropped: {dict(dropped)}); see {out_dir / 'rejected.jsonl'}")

    labels_clean = Counter(str(r.get("label")) for r in records)
    train, test, ev = stratified_split(records, d.test_size, d.eval_size, d.seed)
    timer.step("split")
    if d.balance.method != "none":
        from dsft.data.balance import balance

        try:
            train, under, report_extra["balance"] = balance(train, d.balance.method, cap=d.balance.cap, floor=d.balance.floor,
                                                            temperature=d.balance.temperature, seed=d.seed)
        except ValueError as err:
            raise DataError(str(err)) from err
        for r in under:
            rejected.append(_rejected_row(r, "balance_undersampled", f"class '{r.get('label')}' undersampled to {d.balance.method} target"))
        if under:
            dropped["balance_undersampled"] += len(under)
        timer.step("balance")
    kept = len([r for r in train if r["provenance"] == "original"]) + len(test) + len(ev)
    if d.augment.methods and d.augment.ratio > 0:
        from dsft.data.augment import augment_records

        new, report_extra["augment"] = augment_records(train, d.augment, seed=d.seed, engine=engine, batch_size=d.batch_size)
        train = train + new
        timer.step("augment")
    n_train = len(train)
    if d.label_prompt and d.label_task_in_train and d.label_field:
        train = derive_label_records(train, d.label_prompt, d.system_prompt)
    derived = len(train) - n_train
    timer.step("derive")

    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "test.jsonl", test)
    write_jsonl(out_dir / "eval.jsonl", ev)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    write_jsonl(out_dir / "duplicates.jsonl", duplicates)
    timer.step("write")

    if n_input != kept + sum(dropped.values()):  # pragma: no cover - an invariant, never expected
        raise DataError(f"internal accounting error: input {n_input} ≠ kept {kept} + dropped {dict(dropped)}")
    final = [r for r in train if r["provenance"] == "original"] + test + ev
    labels = sorted({str(r["label"]) for r in final if r.get("label")})
    counts = {"input": n_input, "kept": kept, "dropped": dict(sorted(dropped.items())), "train": n_train,
              "test": len(test), "eval": len(ev), "derived": derived}
    report: dict[str, Any] = {
        "counts": counts,
        "accounting_holds": n_input == kept + sum(dropped.values()),
        "engine": engine.name,
        "files": infos,
        "label_field": d.label_field,
        "train_composition": dict(sorted(Counter(r["provenance"] for r in train).items())),
        "labels": {"before": dict(sorted(labels_before.items())),
                   "after": dict(sorted(labels_clean.items())),
                   "train": dict(sorted(Counter(str(r.get("label")) for r in train if r["provenance"] != "derived:label_task").items())),
                   "test": dict(sorted(Counter(str(r.get("label")) for r in test).items())),
                   "eval": dict(sorted(Counter(str(r.get("label")) for r in ev).items()))},
        "pii": dict(sorted(pii_counts.items())),
    }
    if "near_dedup" in report_extra:
        report["near_dup_examples"] = report_extra["near_dedup"].pop("examples")
    report.update(report_extra)
    _lengths_and_plots(report, cfg, final, out_dir)
    timer.step("report")
    report["timings_s"] = timer.t
    atomic_write_json(out_dir / "data_report.json", report)
    from dsft.data.report import render_md

    atomic_write_text(out_dir / "data_report.md", render_md(report))
    manifest = {"train": "train.jsonl", "test": "test.jsonl", "eval": "eval.jsonl", "report": "data_report.json",
                "counts": counts, "labels": labels, "label_field": d.label_field}
    run.write_manifest("data", manifest)
    log.debug("data: %d in → %d kept (dropped %s); train %d (+%d derived), test %d, eval %d",
              n_input, kept, dict(dropped), n_train, derived, len(test), len(ev))
    return manifest


def record_token_lengths(cfg: Config, records: list[dict]) -> dict[str, list[int]]:
    """Token lengths per field with the model's fast tokenizer (raises when there is none)."""
    from dsft.data.tokens import count_tokens, tokenizer_for

    name = tokenizer_for(cfg)
    tokens: dict[str, list[int]] = {}
    for k in ("question", "answer"):
        texts = [t for t in ((r.get("fields") or {}).get(k) for r in records) if t]
        if texts:
            tokens[k] = count_tokens(name, texts)
    tokens["conversation"] = count_tokens(name, ["\n".join(m["content"] for m in r["messages"]) for r in records])
    return tokens


def _lengths_and_plots(report: dict, cfg: Config, final: list[dict], out_dir,
                       lengths: tuple[dict[str, list[int]], dict[str, list[int]] | None] | None = None) -> None:
    """Length statistics (characters, and tokens when a tokenizer is at hand) and the PNG plots.
    lengths: (chars, tokens or None) already counted (the streaming path counts them batch by batch)."""
    from dsft.data.stats import length_stats, record_lengths
    from dsft.data.tokens import tokenizer_for

    chars = lengths[0] if lengths else record_lengths(final)
    report["lengths_chars"] = {k: length_stats(v) for k, v in chars.items()}
    tokens: dict[str, list[int]] = {}
    try:
        tokens = lengths[1] if lengths and lengths[1] is not None else record_token_lengths(cfg, final)
        if lengths and lengths[1] is None:
            raise RuntimeError("no tokenizer")
        report["tokenizer"] = tokenizer_for(cfg)
    except Exception as err:  # token counts are a report nicety: never fail the stage for them
        report["tokenizer"] = None
        report["tokenizer_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        tokens = {}
    report["lengths_tokens"] = {k: length_stats(v) for k, v in tokens.items()}
    if not cfg.data.report_plots:
        return
    try:
        from dsft.data.report import plot_histograms, plot_labels

        plots = {}
        if plot_histograms({"chars": chars, "tokens": tokens}, out_dir / "lengths.png", "lengths of the kept records"):
            plots["lengths (characters and tokens)"] = "lengths.png"
        lab = report["labels"]
        p, legend = plot_labels({"before": lab["before"], "after cleaning": lab["after"], "train": lab["train"]},
                                out_dir / "labels.png", f"labels ({report['label_field']}) before/after")
        if p:
            plots["labels before/after"] = "labels.png"
            if legend:
                report["plot_label_legend"] = legend
        report["plots"] = plots
    except Exception as err:  # no matplotlib backend / font problems: the report still gets written
        report["plots"] = {}
        report["plot_error"] = f"{type(err).__name__}: {err}"
