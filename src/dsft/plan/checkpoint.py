"""Checkpoints as stored: DeepSeek's FP8 block-quantized linears, the MTP layer, and a folder's safetensors index."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsft.errors import ConfigError
from dsft.plan.models import Arch, fmt_count

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def fp8_matrix_bytes(d_in: int, d_out: int, block: tuple[int, int]) -> int:
    """One FP8 weight (d_out × d_in, 1 byte each) plus its float32 weight_scale_inv: one scale per block, the
    edge blocks zero-padded (ceil(d_out/128) × ceil(d_in/128) scales for 128×128 blocks)."""
    return d_in * d_out + 4 * math.ceil(d_out / block[0]) * math.ceil(d_in / block[1])


def _layer_matrices(arch: Arch, i: int) -> list[tuple[int, int, int]]:
    """(d_in, d_out, count) of the linear weights of decoder layer i that DeepSeek ships in FP8: attention
    projections, the dense MLP or the shared experts, and every routed expert's gate/up/down."""
    # (V3.2's indexer: wq_b and wk FP8, weights_proj stored BF16)
    mats = [(lin.d_in, lin.d_out, 1) for lin in arch.layer_linears(i) if lin.name != "weights_proj"]
    if arch.is_moe_layer(i):
        e, h, mi = arch.n_routed_experts, arch.hidden, arch.moe_intermediate
        mats += [(h, mi, 2 * e), (mi, h, e)]
    return mats


def fp8_layer(arch: Arch, i: int) -> tuple[int, int]:
    """(parameters, bytes) of layer i's FP8-stored weights (0, 0 when the checkpoint is not FP8)."""
    if not arch.fp8_block:
        return 0, 0
    block = arch.fp8_block

    def count() -> tuple[int, int]:
        mats = _layer_matrices(arch, i)
        return sum(n * di * do for di, do, n in mats), sum(n * fp8_matrix_bytes(di, do, block) for di, do, n in mats)

    return arch.cached(("fp8", arch.is_moe_layer(i)), count)


def largest_fp8_module(arch: Arch) -> int:
    """Parameters of the largest FP8 weight dequantized at once (one module; routed experts one expert at a time)."""
    if not arch.fp8_block:
        return 0
    return arch.cached("fp8-largest", lambda: max(di * do for i in range(arch.layers)
                                                  for di, do, _ in _layer_matrices(arch, i)))


def checkpoint_bytes(arch: Arch) -> int:
    """Bytes of the weights on disk: FP8 linears + scales, everything else in the stored dtype, MTP layers included."""
    wb = DTYPE_BYTES.get(arch.dtype, 2)
    fp8_params = fp8_bytes = 0
    for i in range(arch.layers):
        p, b = fp8_layer(arch, i)
        fp8_params, fp8_bytes = fp8_params + p, fp8_bytes + b
    total = (arch.total_params() - fp8_params) * wb + fp8_bytes
    if arch.family == "deepseek_v3":  # the router's e_score_correction_bias: a float32 buffer, not a parameter
        total += 4 * arch.n_routed_experts * (arch.n_moe_layers + arch.mtp_layers)
    if arch.mtp_layers:
        mtp_fp8 = arch.mtp_layers * fp8_layer(arch, arch.layers - 1)[0]
        mtp_fp8_bytes = arch.mtp_layers * fp8_layer(arch, arch.layers - 1)[1]
        total += (arch.mtp_params() - mtp_fp8) * wb + mtp_fp8_bytes
    return total


def weight_format(arch: Arch) -> str:
    """One phrase: how the weights are stored."""
    if arch.fp8_block:
        return f"FP8 e4m3 linears with {arch.fp8_block[0]}×{arch.fp8_block[1]}-block float32 scales"
    return arch.dtype


def describe(arch: Arch) -> str:
    """What the planner knows of the checkpoint, e.g. 'FP8 e4m3 …, 1 MTP layer kept aside, 163 shards'."""
    parts = [weight_format(arch)]
    if arch.mtp_layers:
        parts.append(f"{arch.mtp_layers} MTP layer{'s' if arch.mtp_layers > 1 else ''} "
                     f"({fmt_count(arch.mtp_params())} params) kept aside, not trained")
    info = arch.extra.get("checkpoint") or {}
    if info.get("shards"):
        parts.append(f"{info['shards']} shard{'s' if info['shards'] > 1 else ''}")
    parts.append(f"{_size(checkpoint_bytes(arch))} of weights"
                 + (f" (stored: {_size(info['total_size'])})" if info.get("total_size") else ""))
    return ", ".join(parts)


def _size(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB else f"{n / 1e6:,.1f} MB"


def to_dict(arch: Arch) -> dict[str, Any]:
    return {"dtype": arch.dtype, "fp8_block": list(arch.fp8_block) if arch.fp8_block else None,
            "mtp_layers": arch.mtp_layers, "mtp_params": arch.mtp_params(), "bytes": checkpoint_bytes(arch),
            "format": weight_format(arch), "summary": describe(arch), **(arch.extra.get("checkpoint") or {})}


def _single_file(path: Path) -> tuple[dict[str, str], int]:
    """Tensor names and data bytes of one safetensors file, from its header (8-byte length + JSON; no weights read)."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        size = path.stat().st_size - 8 - n
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from err
    return {k: path.name for k in header if k != "__metadata__"}, size


# ---- a checkpoint folder ----------------------------------------------------------------------------------------
def read_index(folder: Path, arch: Arch) -> dict[str, Any]:
    """What `model.safetensors.index.json` says: shards, total size, FP8 scale tensors, MTP tensors, and any
    disagreement with config.json (returned as `problems`, printed as notes)."""
    path = folder / INDEX
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable JSON index ({err})") from err
        wmap = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ConfigError(f"{path}: expected an object with a non-empty 'weight_map' {{tensor name: shard file}}")
        size = (raw.get("metadata") or {}).get("total_size")
    elif (folder / SINGLE).is_file():
        path = folder / SINGLE
        wmap, size = _single_file(path)
    else:
        return {}
    mtp_prefix = re.compile(r"^model\.layers\.(\d+)\.")
    mtp_ids = {int(m.group(1)) for k in wmap if (m := mtp_prefix.match(k)) and int(m.group(1)) >= arch.layers}
    scales = sum(k.endswith("weight_scale_inv") for k in wmap)
    experts = sum(bool(re.search(r"\.mlp\.experts\.\d+\.", k)) for k in wmap)
    info: dict[str, Any] = {"index": str(path), "shards": len(set(wmap.values())), "tensors": len(wmap),
                            "total_size": int(size) if isinstance(size, int | float) else None,
                            "scale_tensors": scales, "mtp_layers_stored": len(mtp_ids),
                            "per_expert_tensors": experts > 0}
    problems = []
    if arch.fp8_block and not scales:
        problems.append(f"config.json declares FP8 but {path.name} has no weight_scale_inv tensors")
    if scales and not arch.fp8_block:
        problems.append(f"{path.name} has {scales} weight_scale_inv tensors but config.json has no FP8 quantization_config")
    if len(mtp_ids) != arch.mtp_layers and (mtp_ids or path.name == INDEX):  # a plain transformers save: quiet
        problems.append(f"config.json says num_nextn_predict_layers {arch.mtp_layers}, {path.name} stores "
                        f"{len(mtp_ids)} layer(s) after layer {arch.layers - 1} (transformers drops MTP layers on "
                        f"save); planned with {len(mtp_ids)}")
    if info["total_size"]:
        expect = checkpoint_bytes(replace(arch, mtp_layers=len(mtp_ids), extra={}))
        if abs(info["total_size"] - expect) > 0.05 * expect:
            problems.append(f"{path.name} holds {_size(info['total_size'])} of tensors, the config implies "
                            f"{_size(expect)}")
    info["problems"] = problems
    return info
