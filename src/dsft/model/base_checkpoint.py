"""A model folder as stored: FP8 or BF16, how many shards, which MTP layers it keeps — from config.json and headers.

Cheap (no torch, no weights read), so the CLI can print it before any work and the train manifest can record it
as `base_checkpoint` for the export stage, which writes the MTP tensors back bitwise from where this says they are:

    {"format": "fp8" | "bf16" | "fp16" | "fp32", "block": [128, 128] | null, "dir": "/abs/folder",
     "index": "model.safetensors.index.json" | null, "shards": 163, "num_hidden_layers": 61,
     "num_nextn_predict_layers": 1, "mtp_layers": [61], "mtp_prefixes": ["model.layers.61."],
     "mtp_shards": ["model-00160-of-000163.safetensors", …], "mtp_tensors": 1585}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FORMATS = {"F8_E4M3": "fp8", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def weight_map(folder: Path) -> tuple[dict[str, str], str | None]:
    """{tensor: shard file} from the index, else from the single file's header; (map, index name or None)."""
    from dsft.model.info import read_safetensors_header

    if (folder / INDEX).is_file():
        raw = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        return dict(raw.get("weight_map") or {}), INDEX
    files = sorted(folder.glob("*.safetensors"))
    wmap: dict[str, str] = {}
    for f in files:
        wmap.update({k: f.name for k in read_safetensors_header(f)})
    return wmap, None


def _stored_format(folder: Path, wmap: dict[str, str], fp8_block) -> str:
    if fp8_block:
        return "fp8"
    from dsft.model.info import read_safetensors_header

    name = next((n for n in wmap if n.endswith("embed_tokens.weight")), next(iter(wmap), None))
    if name is None:
        return "unknown"
    entry = read_safetensors_header(folder / wmap[name]).get(name) or {}
    return _FORMATS.get(entry.get("dtype", ""), str(entry.get("dtype", "unknown")).lower())


def read_base_checkpoint(model_dir: str | Path) -> dict[str, Any] | None:
    """The stored format of a local model folder (see module docstring); None when it cannot be read."""
    from dsft.model.fp8 import block_size_of

    folder = Path(model_dir)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        wmap, index = weight_map(folder)
    except (OSError, ValueError, AttributeError):
        return None
    if not wmap:
        return None
    n_layers = int(config.get("num_hidden_layers") or 0)
    block = block_size_of(config)
    mtp_ids = sorted({int(m.group(1)) for k in wmap if (m := _LAYER.match(k)) and int(m.group(1)) >= n_layers})
    prefixes = [f"model.layers.{i}." for i in mtp_ids]
    mtp = [k for k in wmap if k.startswith(tuple(prefixes))] if prefixes else []
    try:
        fmt = _stored_format(folder, wmap, block)
    except (OSError, ValueError):
        fmt = "unknown"
    return {"format": fmt, "block": list(block) if block else None, "dir": str(folder.resolve()), "index": index,
            "shards": len(set(wmap.values())), "num_hidden_layers": n_layers,
            "num_nextn_predict_layers": int(config.get("num_nextn_predict_layers") or 0),
            "mtp_layers": mtp_ids, "mtp_prefixes": prefixes, "mtp_shards": sorted({wmap[k] for k in mtp}),
            "mtp_tensors": len(mtp)}


def is_fp8_checkpoint(model_dir: str | Path) -> bool:
    """config.json declares DeepSeek's FP8 block quantization."""
    from dsft.model.fp8 import block_size_of

    try:
        return block_size_of(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))) is not None
    except (OSError, ValueError, AttributeError):
        return False


def describe(info: dict[str, Any] | None) -> str | None:
    """'FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept, 163 shards'; None for a plain single-file folder."""
    if not info or (info["format"] != "fp8" and not info["mtp_layers"] and info["shards"] < 2):
        return None
    parts = [f"FP8 e4m3 base, {info['block'][0]}×{info['block'][1]} blocks" if info["format"] == "fp8"
             else f"{info['format'].upper()} base"]
    n = len(info["mtp_layers"])
    if n:
        parts.append(f"{n} MTP layer{'s' if n > 1 else ''} kept")
    elif info["num_nextn_predict_layers"]:
        parts.append(f"config says {info['num_nextn_predict_layers']} MTP layer(s) but none is stored")
    parts.append(f"{info['shards']} shard{'s' if info['shards'] != 1 else ''}")
    return ", ".join(parts)


def checkpoint_line(name_or_path: str) -> str | None:
    """The one line `dsft data/train/run` print about a local model folder's storage (None for plain folders)."""
    folder = Path(str(name_or_path)).expanduser()
    if not (folder / "config.json").is_file():
        return None
    return describe(read_base_checkpoint(folder))
