"""Readers: JSON / JSONL / CSV / TSV / Parquet / text in any of UTF-8, UTF-8-BOM, GB18030 → raw rows with lines."""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dsft.data.text import clip
from dsft.errors import DataError

EMBEDDED = {"embedded:medical": ("assets/data", "medical_qa_subset.gb18030.csv")}
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
WRAPPER_KEYS = ("data", "records", "items", "examples", "rows", "instances", "train")
csv.field_size_limit(1 << 30)


@dataclass
class RawRow:
    """One input row before mapping: where it came from and its raw key/value data."""

    file: str
    line: int
    data: Any
    error: str | None = None  # set when the row itself is malformed (kept for rejected.jsonl)


def resolve_path(path: str) -> Path:
    """`embedded:medical` → the packaged CSV; anything else is a local file path."""
    if path in EMBEDDED:
        folder, name = EMBEDDED[path]
        return Path(str(resources.files("dsft") / folder / name))
    if path.startswith("embedded:"):
        raise DataError(f"{clip(path)}: unknown embedded dataset (known: {', '.join(EMBEDDED)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{clip(str(p))}: data file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a folder; name the data file(s) in data.path")
    return p


def file_kind(path: Path) -> str:
    """The container format from the file name (csv, tsv, json, jsonl, parquet, text)."""
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        if s in EXTENSIONS:
            return EXTENSIONS[s]
    raise DataError(f"{path}: unknown file type '{path.suffix}' (expected one of {', '.join(sorted(EXTENSIONS))})")


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def decode_bytes(raw: bytes, name: str, encoding: str = "auto") -> tuple[str, str]:
    """Decode a whole file; `auto` tries UTF-8-BOM, UTF-8, then GB18030. One-line DataError with the line."""
    if encoding.lower() != "auto":
        enc = encoding.lower().replace("_", "-")
        try:
            codecs.lookup(enc)
        except LookupError as err:
            raise DataError(f"{name}: unknown encoding {clip(repr(encoding))} (data.encoding)") from err
        if enc in ("utf-8", "utf8") and raw.startswith(codecs.BOM_UTF8):
            enc = "utf-8-sig"
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError as err:
            bad = raw[err.start:err.start + 1].hex()
            raise DataError(f"{name}:{_line_of(raw, err.start)}: not valid {encoding} (byte 0x{bad}); "
                            f"set data.encoding to the file's encoding or 'auto' (detects UTF-8, UTF-8-BOM, GB18030)") from err
    if raw.startswith(codecs.BOM_UTF8):
        try:
            return raw.decode("utf-8-sig"), "utf-8-sig"
        except UnicodeDecodeError as err:
            raise DataError(f"{name}:{_line_of(raw, err.start)}: starts with a UTF-8 BOM but is not valid UTF-8") from err
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), "utf-16"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as utf8_err:
        try:
            return raw.decode("gb18030"), "gb18030"
        except UnicodeDecodeError as err:
            bad = raw[utf8_err.start:utf8_err.start + 1].hex()
            raise DataError(f"{name}:{_line_of(raw, utf8_err.start)}: cannot decode (byte 0x{bad} is neither UTF-8 nor "
                            f"GB18030; GB18030 fails at line {_line_of(raw, err.start)}); set data.encoding") from err


def _iter_csv(text: str | Iterable[str], name: str, delimiter: str) -> Iterator[RawRow]:
    src = io.StringIO(text, newline="") if isinstance(text, str) else text
    reader = csv.reader(src, delimiter=delimiter, strict=True)  # an unclosed quote is an error
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise DataError(f"{name}:1: unreadable CSV header ({err})") from err
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(f"{name}:1: empty CSV header")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{name}:1: duplicate column name(s) {clip(dup)} in the header")
    prev = reader.line_num
    while True:
        start = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{name}:{start}: unreadable CSV row ({err})") from err
        prev = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            yield RawRow(name, start, dict(zip(header, row, strict=False)),
                         error=f"malformed_row: {len(row)} fields, header has {len(header)}")
            continue
        yield RawRow(name, start, dict(zip(header, row, strict=True)))


def _iter_json(text: str, name: str) -> Iterator[RawRow]:
    dec = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i == n:
        return
    if text[i] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # JSON Lines saved as .json: read it as what it is
                yield from _iter_jsonl(text, name)
                return
            raise DataError(f"{name}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err
        if isinstance(obj, dict):
            lists = [k for k, v in obj.items() if k in WRAPPER_KEYS and isinstance(v, list) and all(isinstance(x, dict) for x in v)]
            if len(lists) == 1:  # {"data": [...]} style wrappers
                for k, item in enumerate(obj[lists[0]]):
                    yield RawRow(name, k + 1, item)
                return
            yield RawRow(name, 1, obj)
            return
        raise DataError(f"{name}:1: expected a JSON array of objects or an object, got {type(obj).__name__}")
    i += 1
    line, pos = 1, 0
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            line += text.count("\n", pos, i)
            raise DataError(f"{name}:{line}: not valid JSON (the array is not closed with ']')")
        if text[i] == "]":
            return
        line += text.count("\n", pos, i)
        pos = i
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err
        yield RawRow(name, line, obj)
        i = end


def _lines(text: str | Iterable[str]) -> Iterable[str]:
    """Lines of a decoded text, or an open text file as it is (both split on \\n only, like a file)."""
    return text.split("\n") if isinstance(text, str) else text


def _iter_jsonl(text: str | Iterable[str], name: str) -> Iterator[RawRow]:
    for k, line in enumerate(_lines(text), start=1):
        s = line.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{k}: not valid JSON ({err.msg}, column {err.colno}); each line of a JSONL file must be one JSON object") from err
        yield RawRow(name, k, obj)


def _iter_text(text: str | Iterable[str], name: str) -> Iterator[RawRow]:
    for k, line in enumerate(_lines(text), start=1):
        if line.strip():
            yield RawRow(name, k, {"text": line.strip()})


def _iter_parquet(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{name}: not a readable Parquet file ({type(err).__name__}: {clip(str(err).splitlines()[0])})") from err
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield RawRow(name, row, obj)


def read_rows(path: Path, encoding: str = "auto", display: str | None = None) -> tuple[list[RawRow], dict[str, Any]]:
    """Read every row of one file; returns (rows, info{file, kind, encoding, rows, header})."""
    name = display or str(path)
    kind = file_kind(path)
    info: dict[str, Any] = {"file": name, "kind": kind, "encoding": None}
    if kind == "parquet":
        rows = list(_iter_parquet(path, name))
        info["encoding"] = "parquet"
        info["header"] = list(rows[0].data) if rows and isinstance(rows[0].data, dict) else []
    else:
        text, enc = decode_bytes(path.read_bytes(), name, encoding)
        info["encoding"] = enc
        if kind in ("csv", "tsv"):
            delim = "\t" if kind == "tsv" else ","
            rows = list(_iter_csv(text, name, delim))
            first = text.split("\n", 1)[0]
            info["header"] = [h.strip() for h in next(csv.reader([first.rstrip("\r")], delimiter=delim), [])]
        elif kind == "json":
            rows = list(_iter_json(text, name))
        elif kind == "jsonl":
            rows = list(_iter_jsonl(text, name))
        else:
            rows = list(_iter_text(text, name))
    info["rows"] = len(rows)
    return rows, info


def check_encoding(path: Path, name: str, encoding: str = "auto", chunk: int = 1 << 20) -> str:
    """The file's encoding, checked by decoding it chunk by chunk (constant memory); one-line error with the line."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if encoding.lower() == "auto":
        if head.startswith(codecs.BOM_UTF8):
            candidates = ["utf-8-sig"]
        elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        else:
            candidates = ["utf-8", "gb18030"]
    else:
        enc = encoding.lower().replace("_", "-")
        try:
            codecs.lookup(enc)
        except LookupError as err:
            raise DataError(f"{name}: unknown encoding {clip(repr(encoding))} (data.encoding)") from err
        candidates = ["utf-8-sig" if enc in ("utf-8", "utf8") and head.startswith(codecs.BOM_UTF8) else enc]
    errors = []
    for enc in candidates:
        dec = codecs.getincrementaldecoder(enc)()
        line, ok = 1, True
        with open(path, "rb") as fh:
            while True:
                block = fh.read(chunk)
                try:
                    dec.decode(block, final=not block)
                except UnicodeDecodeError as err:
                    errors.append((enc, line + block.count(b"\n", 0, max(err.start, 0)), block[err.start:err.start + 1].hex()))
                    ok = False
                    break
                if not block:
                    break
                line += block.count(b"\n")
        if ok:
            return enc
    enc, where, byte = errors[0]
    if encoding.lower() != "auto":
        raise DataError(f"{name}:{where}: not valid {encoding} (byte 0x{byte}); set data.encoding to the file's encoding "
                        "or 'auto' (detects UTF-8, UTF-8-BOM, GB18030)")
    raise DataError(f"{name}:{where}: cannot decode (byte 0x{byte} is neither UTF-8 nor GB18030); set data.encoding")


def iter_rows(path: Path, encoding: str = "auto", display: str | None = None) -> tuple[Iterator[RawRow], dict[str, Any]]:
    """Like read_rows, but streams CSV/TSV/JSONL/text/Parquet row by row (a JSON array is still parsed whole)."""
    name = display or str(path)
    kind = file_kind(path)
    if kind == "json":
        rows, info = read_rows(path, encoding, display)
        return iter(rows), info
    info: dict[str, Any] = {"file": name, "kind": kind, "encoding": "parquet" if kind == "parquet" else None}
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            info["header"] = list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataError(f"{name}: not a readable Parquet file ({type(err).__name__}: {clip(str(err).splitlines()[0])})") from err
        return _iter_parquet(path, name), info
    enc = check_encoding(path, name, encoding)
    info["encoding"] = enc

    def gen() -> Iterator[RawRow]:
        with open(path, encoding=enc, newline="") as fh:
            if kind in ("csv", "tsv"):
                yield from _iter_csv(fh, name, "\t" if kind == "tsv" else ",")
            elif kind == "jsonl":
                yield from _iter_jsonl(fh, name)
            else:
                yield from _iter_text(fh, name)

    if kind in ("csv", "tsv"):
        with open(path, encoding=enc, newline="") as fh:
            first = next(csv.reader(fh, delimiter="\t" if kind == "tsv" else ","), [])
        info["header"] = [h.strip() for h in first]
    return gen(), info
