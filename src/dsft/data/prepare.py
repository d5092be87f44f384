"""`dsft.data.prepare`: read → validate → dedup → filter → balance → split → derive → write, with accounting."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from typing import Any

from dsft.config import Config
from dsft.data.readers import read_rows, resolve_path
from dsft.data.schema import Invalid, check_mapping, detect_schema, record_text, seed_mapping, to_record
from dsft.data.text import normalize
from dsft.errors import DataError
from dsft.records import label_prompt_messages
from dsft.run import RunDir, atomic_write_json, atomic_write_text, write_jsonl

log = logging.getLogger("dsft.data")
FORMAT_TO_SCHEMA = {"csv": "seed", "seed": "seed", "alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "openai", "text": "text"}


class Timer:
    """Per-step wall-clock timings for the report."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def step(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.t[name] = round(self.t.get(name, 0.0) + now - t0, 4)
        return now


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
        schema = FORMAT_TO_SCHEMA.get(cfg_data.format) or detect_schema(rows, columns, display)
        keys = info.get("header") or sorted({k for r in rows[:50] if isinstance(r.data, dict) for k in r.data})
        mapping = seed_mapping(keys, columns) if schema == "seed" else columns
        if schema == "seed" and "answer" not in mapping:
            raise DataError(f"{display}:1: no answer column (looked for {', '.join(('answer', 'response', 'reply'))}); "
                            f"map it with data.columns.answer; the file has: {', '.join(keys)}")
        info.update(schema=schema, mapping=mapping)
        n_ok = 0
        for row in rows:
            try:
                records.append(to_record(row, schema, mapping, cfg_data.label_field, cfg_data.system_prompt))
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
    """Keep the first record of each normalised-text key; returns (kept, duplicates rows)."""
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


def stratified_split(records: list[dict], test_size: float, eval_size: float, seed: int
                     ) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic split by label: each class contributes round(n·size) (≥ 1 when it has ≥ 3) to test/eval."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.get("label")), []).append(i)
    where: dict[int, str] = {}
    for label in sorted(groups):
        idx = list(groups[label])
        random.Random(f"{seed}:{label}").shuffle(idx)
        n = len(idx)
        n_test = round(n * test_size)
        if n_test == 0 and n >= 3:
            n_test = 1
        n_eval = round(n * eval_size) if eval_size > 0 else 0
        if eval_size > 0 and n_eval == 0 and n >= 4:
            n_eval = 1
        n_eval = min(n_eval, max(0, n - n_test - 1))
        for k, i in enumerate(idx):
            where[i] = "test" if k < n_test else ("eval" if k < n_test + n_eval else "train")
    train = [r for i, r in enumerate(records) if where[i] == "train"]
    test = [r for i, r in enumerate(records) if where[i] == "test"]
    ev = [r for i, r in enumerate(records) if where[i] == "eval"]
    return train, test, ev


def derive_label_records(train: list[dict], label_prompt: str, system_prompt: str | None) -> list[dict]:
    """train + one classification conversation per labelled record (label as the assistant turn), interleaved."""
    out = []
    for r in train:
        out.append(r)
        if r.get("label") and r.get("provenance") == "original":
            msgs = label_prompt_messages(r, label_prompt, system_prompt)
            out.append({**r, "id": f"{r['id']}#label", "messages": [*msgs, {"role": "assistant", "content": r["label"]}],
                        "provenance": "derived:label_task"})
    return out


def prepare(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Run the data stage into `<run>/data/`; returns the manifest (see docs/ARCHITECTURE.md)."""
    d = cfg.data
    timer = Timer()
    t = time.perf_counter()
    out_dir = run.prepare_stage("data", force=force)
    records, rejected, infos = load_records(d, strict=getattr(d, "strict", False))
    n_input = len(records) + len(rejected)
    if n_input == 0:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no records (empty dataset)")
    dropped: Counter[str] = Counter(r["reason"] for r in rejected)
    labels_before = Counter(str(r.get("label")) for r in records)
    t = timer.step("read", t)

    if d.max_samples and len(records) > d.max_samples:
        keep = sorted(random.Random(d.seed).sample(range(len(records)), d.max_samples))
        dropped["max_samples"] += len(records) - len(keep)
        records = [records[i] for i in keep]
    duplicates: list[dict] = []
    if d.dedup_exact:
        records, dups = exact_dedup(records, list(d.dedup_fields))
        duplicates += dups
        if dups:
            dropped["duplicate_exact"] += len(dups)
        t = timer.step("dedup_exact", t)

    if not records:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no record left after validation and dedup "
                        f"(dropped: {dict(dropped)}); see {out_dir / 'rejected.jsonl'}")
    kept = len(records)
    train, test, ev = stratified_split(records, d.test_size, d.eval_size, d.seed)
    t = timer.step("split", t)
    n_train = len(train)
    if d.label_prompt and d.label_task_in_train and d.label_field:
        train = derive_label_records(train, d.label_prompt, d.system_prompt)
    derived = len(train) - n_train
    t = timer.step("derive", t)

    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "test.jsonl", test)
    write_jsonl(out_dir / "eval.jsonl", ev)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    write_jsonl(out_dir / "duplicates.jsonl", duplicates)
    t = timer.step("write", t)

    assert n_input == kept + sum(dropped.values()), (n_input, kept, dropped)
    labels = sorted({str(r["label"]) for r in records if r.get("label")})
    counts = {"input": n_input, "kept": kept, "dropped": dict(sorted(dropped.items())), "train": n_train,
              "test": len(test), "eval": len(ev), "derived": derived}
    report = {
        "counts": counts,
        "accounting_holds": n_input == kept + sum(dropped.values()),
        "files": infos,
        "label_field": d.label_field,
        "labels": {"before": dict(sorted(labels_before.items())),
                   "after": dict(sorted(Counter(str(r.get("label")) for r in records).items())),
                   "train": dict(sorted(Counter(str(r.get("label")) for r in train if r["provenance"] == "original").items())),
                   "test": dict(sorted(Counter(str(r.get("label")) for r in test).items())),
                   "eval": dict(sorted(Counter(str(r.get("label")) for r in ev).items()))},
        "timings_s": timer.t,
    }
    atomic_write_json(out_dir / "data_report.json", report)
    atomic_write_text(out_dir / "data_report.md", render_report_md(report))
    timer.step("report", t)
    report["timings_s"] = timer.t
    atomic_write_json(out_dir / "data_report.json", report)
    manifest = {"train": "train.jsonl", "test": "test.jsonl", "eval": "eval.jsonl", "report": "data_report.json",
                "counts": counts, "labels": labels, "label_field": d.label_field}
    run.write_manifest("data", manifest)
    log.debug("data: %d in → %d kept (dropped %s); train %d (+%d derived), test %d, eval %d",
             n_input, kept, dict(dropped), n_train, derived, len(test), len(ev))
    return manifest


def render_report_md(rep: dict[str, Any]) -> str:
    """data_report.md: accounting, dropped reasons, label distribution before/after, timings."""
    c = rep["counts"]
    lines = ["# dsft data report", "",
             f"**input {c['input']} = kept {c['kept']} + dropped {sum(c['dropped'].values())}** "
             f"(accounting holds: {rep['accounting_holds']})", "",
             f"Split: train {c['train']} (+{c['derived']} derived classification records), test {c['test']}, eval {c['eval']}.", "",
             "## Inputs", "", "| file | kind | encoding | schema | rows | valid |", "|---|---|---|---|---|---|"]
    for i in rep["files"]:
        lines.append(f"| {i['file']} | {i['kind']} | {i['encoding']} | {i.get('schema')} | {i['rows']} | {i.get('valid', 0)} |")
    lines += ["", "## Dropped by reason", "", "| reason | records |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in c["dropped"].items()] or ["| — | 0 |"]
    lab = rep["labels"]
    if any(k != "None" for k in lab["before"]):
        lines += ["", f"## Labels (`{rep['label_field']}`) before → after", "",
                  "| label | before | after | train | test | eval |", "|---|---|---|---|---|---|"]
        for k in sorted(lab["before"], key=lambda x: -lab["before"][x]):
            lines.append(f"| {k} | {lab['before'][k]} | {lab['after'].get(k, 0)} | {lab['train'].get(k, 0)} | "
                         f"{lab['test'].get(k, 0)} | {lab['eval'].get(k, 0)} |")
    lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in rep["timings_s"].items()], ""]
    return "\n".join(lines)


__all__ = ["prepare", "load_records", "exact_dedup", "stratified_split", "derive_label_records"]
