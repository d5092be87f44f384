"""Cheap facts about a model before loading it: parameter count, random-init or trained, fully trainable modules.

Reads only the safetensors headers (a few KB per file) and a few norm tensors — no torch, no weights in memory —
so config resolution (`dsft.config.resolve`) can pick a size class for every command, even `dsft data prepare`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
MAX_HEADER_BYTES = 100 * 1024 * 1024
NORM_SUFFIXES = ("norm", "layernorm")
# the bytes of 1.0 and 0.0 per safetensors dtype: transformers initialises RMSNorm/LayerNorm weights to 1
# (Gemma's (1 + w) norms to 0); after any training a norm is never one repeated value
_INIT_VALUES = {
    "F32": (struct.pack("<f", 1.0), struct.pack("<f", 0.0)),
    "F16": (struct.pack("<e", 1.0), struct.pack("<e", 0.0)),
    "BF16": (struct.pack("<f", 1.0)[2:], b"\x00\x00"),
    "F64": (struct.pack("<d", 1.0), struct.pack("<d", 0.0)),
}
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")


@dataclass(frozen=True)
class ModelInfo:
    """What resolution needs to know about the configured model."""

    name: str
    params: int | None
    """Total parameters; None when unknown (a hub id or file with no size in its name)."""
    params_source: str
    """How params was found: safetensors headers, the model name, or unknown."""
    random_init: bool
    random_init_why: str
    local_dir: str | None = None
    fully_trainable: tuple[str, ...] = ()
    """Leaf module names of the embeddings, LM head and norms (LoRA's modules_to_save on tiny random-init models)."""

    def describe(self) -> str:
        size = f"{self.params / 1e6:,.1f} M parameters" if self.params is not None else "size unknown"
        kind = "random-init" if self.random_init else "pretrained"
        return f"{kind}, {size} ({self.params_source})"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name → dtype, shape, data_offsets)."""
    return _header_and_length(path)[0]


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header incl. `__metadata__`, its length in bytes) of a safetensors file; ValueError when it is not one."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {n} bytes (limit {MAX_HEADER_BYTES})")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    return header, n


def _header_and_length(path: Path) -> tuple[dict, int]:
    header, n = safetensors_header(path)
    header.pop("__metadata__", None)
    return header, n


def weight_files(model_dir: Path) -> list[Path]:
    """The folder's safetensors files: those its index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [model_dir / n for n in names if (model_dir / n).is_file()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return sorted(model_dir.glob("*.safetensors"))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _is_constant_init(path: Path, header_len: int, entry: dict) -> bool:
    values = _INIT_VALUES.get(entry.get("dtype", ""))
    b, e = entry.get("data_offsets", (0, 0))
    if values is None or e <= b or e - b > 1 << 24:
        return False
    with open(path, "rb") as f:
        f.seek(8 + header_len + b)
        data = f.read(e - b)
    if len(data) != e - b:
        return False
    return any(data == v * (len(data) // len(v)) for v in values)


def _scan_folder(model_dir: Path) -> tuple[int | None, bool, str, tuple[str, ...]]:
    """(params, random_init, why, fully trainable leaves) from the folder's safetensors headers."""
    files = weight_files(model_dir)
    if not files:
        return None, False, "no safetensors weights to inspect", ()
    total, leaves, norms = 0, set(), []
    for path in files:
        try:
            header, header_len = _header_and_length(path)
        except (OSError, ValueError) as err:
            return None, False, f"unreadable weights ({str(err)[:200]})", ()
        for name, entry in header.items():
            if not isinstance(entry, dict) or name.endswith(("_scale_inv", ".weight_scale")):
                continue
            total += _numel(entry.get("shape", []))
            module, _, _ = name.rpartition(".")
            leaf = module.rsplit(".", 1)[-1]
            if leaf in ("embed_tokens", "lm_head") or leaf.endswith(NORM_SUFFIXES):
                leaves.add(leaf)
            if leaf.endswith(NORM_SUFFIXES) and name.endswith(".weight") and len(norms) < 4:
                norms.append((path, header_len, entry))
    if "embed_tokens" in leaves:
        leaves.add("lm_head")  # a causal LM always has the head module, tied or not
    if not norms:
        return total, False, "no norm weights to inspect: treated as pretrained", tuple(sorted(leaves))
    if all(_is_constant_init(*n) for n in norms):
        return total, True, "norm weights still at their initial value: random-init", tuple(sorted(leaves))
    return total, False, "trained norm weights: pretrained", tuple(sorted(leaves))


def params_from_name(name: str) -> int | None:
    """A size written in the model name ("deepseek-llm-7b-base" → 7e9, "gemma-3-270m" → 2.7e8), else None."""
    m = _SIZE_IN_NAME.search(Path(name).name.lower())
    if not m:
        return None
    return int(float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6))


def read_model_info(name_or_path: str) -> ModelInfo:
    """Model facts for resolution; never raises for a missing model (the stage that loads it says why)."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        from dsft.model.load import resolve_model_dir

        d = resolve_model_dir(name_or_path)
        params, _, _, leaves = _scan_folder(d)
        return ModelInfo(name_or_path, params, "safetensors headers", True,
                         "the embedded model is built by code with random weights", str(d), leaves)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        params, random_init, why, leaves = _scan_folder(p)
        if params is not None:
            return ModelInfo(name_or_path, params, "safetensors headers", random_init, why, str(p), leaves)
    guess = params_from_name(name_or_path)
    where = "local folder without readable weights" if p.is_dir() else "not a local folder"
    if guess is not None:
        return ModelInfo(name_or_path, guess, "size in the model name", False, f"{where}: assumed pretrained",
                         str(p) if p.is_dir() else None)
    return ModelInfo(name_or_path, None, "unknown", False, f"{where}, no size in its name: assumed pretrained",
                     str(p) if p.is_dir() else None)
