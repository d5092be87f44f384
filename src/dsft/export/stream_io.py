"""Safetensors read/write one tensor at a time with plain file I/O, so a shard never sits in memory whole.

`safe_open` memory-maps the shard: every page a tensor touches stays resident and counts in the process's RSS until
the file is closed (measured here: reading a 512 MB shard tensor by tensor through safe_open grew RSS by 516 MB).
These helpers read one tensor's byte range with `readinto`, copy untouched tensors file-to-file with
`os.copy_file_range` (no user-space buffer), and write a shard whose header is planned before any data.
The format (8-byte little-endian header length, JSON header, data) is safetensors' own; the output reads back with
`safe_open` / `load_file` / transformers (tested).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from dsft.errors import ExportError
from dsft.model.info import safetensors_header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a shard: name, dtype code, shape, absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({name: TensorInfo} in file order, __metadata__) of a safetensors file, from its header alone."""
    path = Path(path)
    try:
        header, n = safetensors_header(path)
    except (OSError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ExportError(f"{path}: cannot read the safetensors header ({type(err).__name__}: {str(err)[:200]})") from err
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = {}
    for name, d in header.items():
        if d.get("dtype") not in DTYPES:
            raise ExportError(f"{path}: tensor {name!r} has dtype {d.get('dtype')!r}, not one dsft reads "
                              f"({', '.join(DTYPES)})")
        b, e = d["data_offsets"]
        infos[name] = TensorInfo(name, d["dtype"], tuple(int(s) for s in d["shape"]), base + int(b), base + int(e))
    return dict(sorted(infos.items(), key=lambda kv: kv[1].start)), meta


def read_tensor(fh: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor read from an open shard into its own (writable) memory."""
    buf = bytearray(info.nbytes)
    fh.seek(info.start)
    if fh.readinto(buf) != info.nbytes:
        raise ExportError(f"{getattr(fh, 'name', 'shard')}: tensor {info.name!r} is cut short (file truncated?)")
    if not buf:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(info.torch_dtype).reshape(info.shape)


def copy_range(src: BinaryIO, start: int, nbytes: int, dst: BinaryIO, dst_pos: int) -> None:
    """Copy nbytes of src from `start` to dst at `dst_pos`, kernel-side (`copy_file_range`) when the OS can."""
    dst.flush()
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done, start + done, dst_pos + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # no copy_file_range here (or not across these file systems): plain reads
        pass
    src.seek(start + done)
    dst.seek(dst_pos + done)
    while done < nbytes:
        chunk = src.read(min(COPY_CHUNK, nbytes - done))
        if not chunk:
            raise ExportError(f"{getattr(src, 'name', 'shard')}: file ends inside a tensor (truncated?)")
        dst.write(chunk)
        done += len(chunk)


class ShardWriter:
    """Write one safetensors file whose tensors (name, dtype, shape) are declared up front, then added in any order.

    Tensors are laid out by decreasing element size (then name), so every tensor starts at a multiple of its element
    size, as safetensors itself does. `close()` checks every declared tensor was written.
    """

    def __init__(self, path: str | Path, planned: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        order = sorted(planned, key=lambda t: (-t[1].itemsize, t[0]))
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, dtype, shape in order:
            n = dtype.itemsize
            for s in shape:
                n *= int(s)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[name] = (pos, pos + n)
            pos += n
        self.data_bytes = pos
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self._fh = open(self.path, "wb")  # noqa: SIM115 - kept open across add() calls, closed in close()
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self.base + self.data_bytes)
        self._written: set[str] = set()

    def _place(self, name: str, nbytes: int) -> int:
        if name not in self.offsets or name in self._written:
            raise ExportError(f"{self.path}: tensor {name!r} was not planned for this shard, or written twice")
        b, e = self.offsets[name]
        if e - b != nbytes:
            raise ExportError(f"{self.path}: tensor {name!r} has {nbytes} bytes, {e - b} were planned")
        self._written.add(name)
        return self.base + b

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a tensor's bytes at its planned place."""
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.seek(self._place(name, flat.numel()))
        if flat.numel():
            self._fh.write(flat.numpy())

    def copy(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        """Copy a tensor's bytes unchanged from an input shard (bitwise)."""
        copy_range(src, info.start, info.nbytes, self._fh, self._place(name, info.nbytes))

    def close(self) -> int:
        """Finish the file; the bytes it holds."""
        missing = set(self.offsets) - self._written
        self._fh.close()
        if missing:
            raise ExportError(f"{self.path}: {len(missing)} planned tensors were never written (e.g. {sorted(missing)[0]!r})")
        return self.base + self.data_bytes
