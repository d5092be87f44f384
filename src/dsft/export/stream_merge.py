"""Merge a LoRA/DoRA adapter into a sharded base (FP8 e4m3 + weight_scale_inv, or BF16/FP16/FP32) one shard at a time.

For each input shard: read its tensors one by one → dequantize the ones the adapter touches → add the LoRA delta →
write FP8 again (same block format, fresh `weight_scale_inv`, `quantization_config` kept) or BF16/FP16/FP32; tensors
the adapter does not touch (the MTP layer `model.layers.{num_hidden_layers}.*` included) are copied bitwise when
their dtype stays, then the index. Memory: a few tensors and the adapter slices of the current shard, never a
shard and never the model. `stream_report` states the re-quantization error of every FP8 class.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.errors import ExportError
from dsft.export.stream_io import ShardWriter, TensorInfo, read_header, read_tensor
from dsft.export.stream_lora import AdapterTensors, Edit, merged_tensor, plan_edits
from dsft.model import fp8
from dsft.run import atomic_dir

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
OUT_FORMATS: dict[str, torch.dtype] = {"fp8": fp8.FP8_DTYPE, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                       "float32": torch.float32}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float8_e4m3fn": "fp8"}
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ROUTER_RE = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
SKIPPED_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
FP16_MAX = 65504.0
CLASSES = ("attention", "dense_mlp", "shared_experts", "routed_experts", "mtp", "other")


def is_stream_base(model_dir: str | Path) -> bool:
    """True for a folder the streaming merge is for: sharded (an index) or FP8 (quantization_config fp8)."""
    d = Path(model_dir)
    if (d / INDEX).is_file():
        return True
    try:
        return fp8.block_size_of(json.loads((d / "config.json").read_text(encoding="utf-8"))) is not None
    except (OSError, ValueError):
        return False


def out_format_of(name: str) -> str:
    """The canonical output format name (fp8, bfloat16, float16, float32) of a user's spelling; one-line error."""
    fmt = ALIASES.get(name, name)
    if fmt not in OUT_FORMATS:
        raise ExportError(f"stream merge: output format {name!r} unknown (fp8, bf16, fp16, fp32)")
    return fmt


def tensor_class(name: str, num_hidden_layers: int | None = None) -> str:
    """attention, dense_mlp, shared_experts, routed_experts, mtp (layer ≥ num_hidden_layers) or other."""
    m = LAYER_RE.match(name)
    if m and num_hidden_layers is not None and int(m.group(1)) >= num_hidden_layers:
        return "mtp"
    if ".shared_experts." in name or ".shared_expert." in name:
        return "shared_experts"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name and re.search(r"\.(gate|up|down)_proj\.", name):
        return "dense_mlp"
    return "other"


@dataclass
class Checkpoint:
    """A safetensors model folder read from its headers: config, shard files in order, where every tensor lives."""

    root: Path
    config: dict[str, Any]
    shards: list[str]
    where: dict[str, str]  # tensor name → shard file
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    block: tuple[int, int] | None = None

    def read(self, name: str) -> torch.Tensor:
        with open(self.root / self.where[name], "rb") as fh:
            return read_tensor(fh, self.infos[name])

    def is_fp8_weight(self, name: str) -> bool:
        return self.infos[name].torch_dtype == fp8.FP8_DTYPE

    def scale_of(self, name: str) -> str:
        return name + fp8.SCALE_SUFFIX

    def weight_of_scale(self, name: str) -> str | None:
        """The FP8 weight a `…weight_scale_inv` tensor belongs to (None for any other tensor)."""
        if not name.endswith(fp8.SCALE_SUFFIX):
            return None
        w = name[: -len(fp8.SCALE_SUFFIX)]
        return w if w in self.infos and self.is_fp8_weight(w) else None

    def dequantized(self, name: str) -> torch.Tensor:
        """An FP8 weight × its block scales, float32."""
        return fp8.dequantize(self.read(name), self.read(self.scale_of(name)).float(), self.block)


def read_checkpoint(model_dir: str | Path) -> Checkpoint:
    """The folder's config.json, shard list (index or the single model.safetensors) and every tensor's place."""
    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{root / 'config.json'}: cannot read it ({type(err).__name__}: {str(err)[:200]})") from err
    if (root / INDEX).is_file():
        try:
            wmap = json.loads((root / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{root / INDEX}: key 'weight_map' unreadable ({type(err).__name__})") from err
        shards = sorted(set(wmap.values()))
    elif (root / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ExportError(f"{root}: no {INDEX} and no model.safetensors (the streaming merge reads safetensors only)")
    ck = Checkpoint(root, config, shards, {}, block=fp8.block_size_of(config))
    for shard in shards:
        infos, _ = read_header(root / shard)
        for name, info in infos.items():
            if name in ck.where:
                raise ExportError(f"{root}: tensor {name!r} is in both {ck.where[name]} and {shard}")
            ck.where[name], ck.infos[name] = shard, info
    if (root / INDEX).is_file() and set(wmap) != set(ck.where):
        missing = sorted(set(wmap) ^ set(ck.where))[0]
        raise ExportError(f"{root / INDEX}: weight_map and the shards disagree (e.g. {missing!r})")
    _check_fp8_pairs(ck)
    return ck


def _check_fp8_pairs(ck: Checkpoint) -> None:
    fp8_weights = [n for n, i in ck.infos.items() if i.torch_dtype == fp8.FP8_DTYPE]
    if fp8_weights and ck.block is None:
        raise ExportError(f"{ck.root / 'config.json'}: {len(fp8_weights)} float8 tensors (e.g. {fp8_weights[0]!r}) but "
                          f"no quantization_config with quant_method fp8")
    for name in fp8_weights:
        scale = ck.scale_of(name)
        if scale not in ck.infos:
            raise ExportError(f"{ck.root}: FP8 tensor {name!r} has no {scale!r}")
        if ck.infos[scale].shape != fp8.scale_shape(ck.infos[name].shape, ck.block):
            raise ExportError(f"{ck.root}: {scale!r} has shape {ck.infos[scale].shape}, expected "
                              f"{fp8.scale_shape(ck.infos[name].shape, ck.block)} for {ck.block} blocks")


def out_dtype(ck: Checkpoint, name: str, fmt: str) -> torch.dtype | None:
    """dtype a tensor is written in (None: dropped). fp8 keeps every dtype; a dense format turns FP8 weights and
    every floating tensor into it, drops the scales, and keeps the router (`mlp.gate.*`) as it is."""
    dt = ck.infos[name].torch_dtype
    if fmt == "fp8":
        return dt
    if ck.weight_of_scale(name) is not None:
        return None
    if dt == fp8.FP8_DTYPE or (dt in FLOATS and not ROUTER_RE.search(name)):
        return OUT_FORMATS[fmt]
    return dt


@dataclass
class _Run:
    """The state of one merge: inputs, the adapter, running counts and FP8 error sums per class."""

    ck: Checkpoint
    fmt: str
    edits: dict[str, Edit]
    ad: AdapterTensors | None
    counts: dict[str, int] = field(default_factory=lambda: {"copied": 0, "converted": 0, "merged": 0, "dropped": 0})
    touched: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    pending_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # fresh scale_inv, written with its shard

    def klass(self, name: str) -> str:
        return tensor_class(name, self.ck.config.get("num_hidden_layers"))

    def merged_fp32(self, name: str) -> torch.Tensor:
        w = self.ck.dequantized(name) if self.ck.is_fp8_weight(name) else self.ck.read(name).float()
        return merged_tensor(w, self.edits[name], self.ad)

    def requantized(self, name: str, *, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3, scale_inv) of a touched FP8 weight, merged; its error vs the BF16 merge goes to the report."""
        merged = self.merged_fp32(name)
        q, s = fp8.quantize(merged, self.ck.block)
        if record:
            mx, mean = fp8.relative_error(merged.to(torch.bfloat16), fp8.dequantize(q, s, self.ck.block))
            e = self.errors.setdefault(self.klass(name), {"tensors": 0, "elements": 0, "max": 0.0, "sum": 0.0})
            e["tensors"] += 1
            e["elements"] += merged.numel()
            e["max"] = max(e["max"], mx)
            e["sum"] += mean * merged.numel()
        return q, s

    def produce(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor to write for `name` (None: copy the input bytes unchanged)."""
        ck = self.ck
        weight = ck.weight_of_scale(name)
        if weight is not None:  # fp8 output only (dense formats drop scales); the weight usually came first
            if weight not in self.edits:
                return None
            if name in self.pending_scales:
                return self.pending_scales.pop(name)
            return self.requantized(weight, record=False)[1]  # its weight lives in a later shard: computed twice
        if name in self.edits:
            self.touched[self.klass(name)] = self.touched.get(self.klass(name), 0) + 1
            if dtype == fp8.FP8_DTYPE:
                q, s = self.requantized(name)
                self.pending_scales[ck.scale_of(name)] = s
                return q
            return _cast(self.merged_fp32(name), dtype, name)
        if dtype == ck.infos[name].torch_dtype:
            return None
        t = ck.dequantized(name) if ck.is_fp8_weight(name) else ck.read(name)
        return _cast(t, dtype, name)


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and t.numel() and float(t.abs().max()) > FP16_MAX:
        raise ExportError(f"stream merge to float16: tensor {name!r} holds {float(t.abs().max()):.4g}, beyond fp16's "
                          f"{FP16_MAX:g}; export bf16 or fp8 instead")
    return t.to(dtype)


def _plan_shards(run: _Run) -> dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    plan: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {s: [] for s in run.ck.shards}
    for name, shard in run.ck.where.items():
        dt = out_dtype(run.ck, name, run.fmt)
        if dt is not None:
            plan[shard].append((name, dt, run.ck.infos[name].shape))
    return plan


def _planned_bytes(plan: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]) -> int:
    return sum(dt.itemsize * int(torch.Size(shape).numel()) for rows in plan.values() for _, dt, shape in rows)


def _preload_adapter(run: _Run, names: list[str]) -> None:
    """Read the adapter tensors this shard needs before any temporary exists (they then sit below them in memory)."""
    if run.ad is None:
        return
    for name in names:
        edit = run.edits.get(name)
        if edit is None:
            continue
        keys = [edit.replace_key] if edit.kind == "replace" else [edit.factor.a_key, edit.factor.b_key,
                                                                    edit.factor.magnitude_key]
        for key in keys:
            if key is not None:
                run.ad.get(key)


def _write_shard(run: _Run, shard: str, rows: list[tuple[str, torch.dtype, tuple[int, ...]]], dest: Path) -> int:
    """Write one output shard; tensors in input file order; returns its bytes.

    A touched FP8 weight's fresh scale is written right after it when both live in this shard (nothing small is
    left allocated between large temporaries); otherwise it waits in run.pending_scales for its shard.
    """
    writer = ShardWriter(dest, rows, metadata={"format": "pt"})
    dtypes = {name: dt for name, dt, _ in rows}
    order = sorted(dtypes, key=lambda n: (run.ck.weight_of_scale(n) is not None, run.ck.infos[n].start))
    _preload_adapter(run, order)
    done: set[str] = set()
    with open(run.ck.root / shard, "rb") as src:
        for name in order:
            if name in done:
                continue
            t = run.produce(name, dtypes[name])
            if t is None:
                writer.copy(name, src, run.ck.infos[name])
                run.counts["copied"] += 1
                continue
            writer.add(name, t)
            del t
            run.counts["merged" if name in run.edits or run.ck.weight_of_scale(name) else "converted"] += 1
            scale = run.ck.scale_of(name)
            if scale in dtypes and scale in run.pending_scales:
                writer.add(scale, run.pending_scales.pop(scale))
                run.counts["merged"] += 1
                done.add(scale)
    run.counts["dropped"] += sum(1 for n, s in run.ck.where.items() if s == shard and n not in dtypes)
    if run.ad is not None:
        run.ad.clear()
    return writer.close()


def _write_config(ck: Checkpoint, fmt: str, dest: Path) -> None:
    cfg = dict(ck.config)
    if fmt != "fp8":
        cfg.pop("quantization_config", None)
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = fmt
        if "torch_dtype" not in cfg and "dtype" not in cfg:
            cfg["torch_dtype"] = fmt
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_side_files(root: Path, dest: Path) -> None:
    """Top-level files other than weights, the index and config.json (tokenizer, generation config, code, licence)."""
    for f in sorted(root.iterdir()):
        if f.is_file() and f.name not in (INDEX, "config.json") and not f.name.endswith(SKIPPED_FILES):
            shutil.copy2(f, dest / f.name)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which keeps the forking parent's
    peak), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _error_summary(errors: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"tensors": int(v["tensors"]), "elements": int(v["elements"]), "max_rel": v["max"],
                "mean_rel": v["sum"] / v["elements"] if v["elements"] else 0.0} for k, v in sorted(errors.items())}


def _base_format(ck: Checkpoint) -> str:
    if ck.block is not None:
        return "fp8"
    dts = {i.torch_dtype for n, i in ck.infos.items() if i.torch_dtype in FLOATS and not ROUTER_RE.search(n)}
    return str(max(dts, key=lambda d: d.itemsize)).removeprefix("torch.") if dts else "unknown"


def stream_merge(base_dir: str | Path, out_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 out_format: str = "fp8") -> dict[str, Any]:
    """Merge `adapter_dir` (or nothing: a format conversion) into the base, shard by shard, into `out_dir`.

    Returns the stream report: formats, counts, touched tensors per class, FP8 re-quantization error per class
    (max and element-mean relative error of merged FP8 vs merged BF16, each tensor normalised by its max |BF16|),
    bytes, seconds, the process's peak RSS.
    """
    t0 = time.perf_counter()
    fmt = out_format_of(out_format)
    ck = read_checkpoint(base_dir)
    if fmt == "fp8" and ck.block is None:
        raise ExportError(f"{ck.root}: output format fp8 needs an FP8 base (quantization_config fp8); this base is "
                          f"{_base_format(ck)}: export bf16 / fp16 instead")
    ad, edits = None, {}
    if adapter_dir is not None:
        from dsft.model.adapters import check_adapter_dir, read_adapter_config

        adapter_dir = check_adapter_dir(adapter_dir)
        ad = AdapterTensors(adapter_dir)
        edits = plan_edits(adapter_dir, read_adapter_config(adapter_dir), ck.infos, ad)
    run = _Run(ck, fmt, edits, ad)
    plan = _plan_shards(run)
    out_dir = Path(out_dir)
    need, free = _planned_bytes(plan), shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else ".").free
    if need > free:
        raise ExportError(f"{out_dir}: the merged model needs {need / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free")
    bytes_out = 0
    with atomic_dir(out_dir) as tmp:
        for i, shard in enumerate(ck.shards, 1):
            bytes_out += _write_shard(run, shard, plan[shard], tmp / shard)
            log.info("stream merge: shard %d/%d %s", i, len(ck.shards), shard)
        if (ck.root / INDEX).is_file() or len(ck.shards) > 1:
            wmap = {n: s for s in ck.shards for n, _, _ in plan[s]}
            index = {"metadata": {"total_size": need}, "weight_map": dict(sorted(wmap.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_config(ck, fmt, tmp)
        _copy_side_files(ck.root, tmp)
    n_layers = ck.config.get("num_hidden_layers")
    return {
        "merge": "stream", "base_format": _base_format(ck), "out_format": fmt, "shards": len(ck.shards),
        "tensors": len(ck.infos), "params": sum(int(torch.Size(i.shape).numel()) for n, i in ck.infos.items()
                                                 if ck.weight_of_scale(n) is None),
        "adapter": str(adapter_dir) if adapter_dir else None, **run.counts,
        "touched": dict(sorted(run.touched.items())), "requant_error": _error_summary(run.errors),
        "mtp_tensors": sum(1 for n in ck.infos if tensor_class(n, n_layers) == "mtp"),
        "bytes_in": sum((ck.root / s).stat().st_size for s in ck.shards), "bytes_out": bytes_out,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }
