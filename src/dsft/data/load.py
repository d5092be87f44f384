"""Reading step: every configured file → canonical records (or the reason a row is invalid), with per-file info."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from dsft.data.readers import RawRow, iter_rows, read_rows, resolve_path
from dsft.data.schema import Invalid, check_mapping, detect_schema, seed_mapping, to_record
from dsft.data.text import clip
from dsft.errors import DataError

FORMAT_TO_SCHEMA = {"csv": "seed", "seed": "seed", "alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "openai", "text": "text"}
SCHEMA_PROBE = 50  # rows whose keys decide the schema (and the mapping check when the file is streamed)


def data_paths(d) -> list[str]:
    """data.path as a list (one-line error when empty)."""
    paths = d.path if isinstance(d.path, list) else [d.path]
    if not paths:
        raise DataError("data.path: no input file given")
    return paths


def iter_file(spec: str, d, info: dict[str, Any], *, streaming: bool = False) -> Iterator[tuple[RawRow, dict | Invalid]]:
    """(raw row, canonical record or Invalid) for each row of one file. `info` is filled as the rows go by and is
    complete once the iterator is exhausted: file, kind, encoding, header, rows, schema, mapping, valid.
    streaming: read row by row (CSV/TSV/JSONL/text/Parquet) instead of decoding the whole file first."""
    path = resolve_path(spec)
    display = spec if spec.startswith("embedded:") else str(path)
    if streaming:  # the mapping is checked against the first rows' keys
        rows, base = iter_rows(path, d.encoding, display)
        head = probe = list(itertools.islice(rows, SCHEMA_PROBE))
        rest: Iterator[RawRow] = rows
    else:  # in memory: against every row's keys
        rows, base = read_rows(path, d.encoding, display)
        head, probe, rest = rows[:SCHEMA_PROBE], rows, iter(rows[SCHEMA_PROBE:])
    base.pop("rows", None)
    info.update(base)
    columns = dict(d.columns)
    if info.get("header"):
        check_mapping(columns, info["header"], display)
    elif columns and probe:
        check_mapping(columns, {k for r in probe if isinstance(r.data, dict) for k in r.data}, display)
    if not head:
        info.update(rows=0, schema=None)
        return
    schema, mapping = _schema_and_mapping(head, d, display, info.get("header"))
    n_rows = n_ok = 0
    for row in itertools.chain(head, rest):
        n_rows += 1
        try:
            rec = to_record(row, schema, mapping, d.label_field, d.system_prompt, d.tools_in_system)
        except Invalid as bad:
            yield row, bad
            continue
        n_ok += 1
        yield row, rec
    info.update(rows=n_rows, schema=schema, mapping=mapping, valid=n_ok)


def _schema_and_mapping(head: list[RawRow], d, display: str, header: list[str] | None) -> tuple[str, dict[str, str]]:
    columns = dict(d.columns)
    schema = FORMAT_TO_SCHEMA.get(d.format) or detect_schema(head, columns, display, header)
    keys = header or sorted({k for r in head if isinstance(r.data, dict) for k in r.data})
    mapping = seed_mapping(keys, columns) if schema == "seed" else columns
    if schema == "seed" and "answer" not in mapping:
        raise DataError(f"{display}:1: no answer column (looked for answer, response, reply); "
                        f"map it with data.columns.answer; the file has: {clip(', '.join(keys))}")
    return schema, mapping


def invalid_row(row: RawRow, bad: Invalid) -> dict[str, Any]:
    """The rejected.jsonl row of an input row that is not a valid record."""
    return {"file": row.file, "line": row.line, "reason": bad.reason, "detail": bad.detail, "data": row.data}


def strict_error(row: RawRow, bad: Invalid) -> DataError:
    return DataError(f"{row.file}:{row.line}: {bad.reason}: {clip(bad.detail)} (--strict)")


def read_all(d, add: Callable[[dict], None], reject: Callable[[dict, str], None], *, strict: bool = False,
             streaming: bool = False, on_rows: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Read every configured file: add(record) for each valid one, reject(row, reason) for the others (or raise on
    the first with strict). on_rows(n): progress, called every 1,000 rows. Returns the per-file info."""
    infos: list[dict[str, Any]] = []
    for spec in data_paths(d):
        info: dict[str, Any] = {}
        n = 0
        for row, got in iter_file(spec, d, info, streaming=streaming):
            if isinstance(got, Invalid):
                if strict:
                    raise strict_error(row, got)
                reject(invalid_row(row, got), got.reason)
            else:
                add(got)
            n += 1
            if on_rows and n % 1000 == 0:
                on_rows(1000)
        if on_rows:
            on_rows(n % 1000)
        infos.append(info)
    return infos


def load_records(cfg_data, *, strict: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """Read every configured file into memory → (records, rejected rows, per-file info)."""
    records: list[dict] = []
    rejected: list[dict] = []
    infos = read_all(cfg_data, records.append, lambda row, reason: rejected.append(row), strict=strict)
    return records, rejected, infos


def require_records(n: int, infos: list[dict[str, Any]]) -> None:
    """One-line error for an input without a single row."""
    if n == 0:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no records (empty dataset)")
