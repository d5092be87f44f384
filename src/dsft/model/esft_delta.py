"""ESFT expert deltas: write, read, check, apply to a loaded base, and merge into a base folder shard by shard.

A delta is a folder with `esft_delta.safetensors` — the trained tensors only, named as DeepSeek's checkpoints name
them (`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, plus shared-expert / non-expert tensors when those
were trained) — and `esft_delta.json`: the base it belongs to, the experts per layer, how they were chosen, and the
sha256 of the base tensors it replaces (so a delta is never applied to another base). The tensors are the trained
weights themselves, not differences: base + delta reproduces the trained model bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from dsft.errors import ModelError
from dsft.run import atomic_write_json

DELTA_FILE = "esft_delta.safetensors"
DELTA_JSON = "esft_delta.json"
FORMAT = "dsft-esft-delta/1"
_EXPERT_KEY = re.compile(r"^(?P<mod>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$")


def expert_key(layer: int, expert: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"


def expert_tensors(rows: dict[tuple[int, int], tuple[Any, Any]]) -> dict[str, Any]:
    """{(layer, expert): (fused gate_up (2I, H), down (H, I))} → checkpoint-named gate/up/down tensors."""
    out = {}
    for (layer, e), (gate_up, down) in sorted(rows.items()):
        gate, up = gate_up.chunk(2, dim=0)
        out[expert_key(layer, e, "gate")] = gate.contiguous()
        out[expert_key(layer, e, "up")] = up.contiguous()
        out[expert_key(layer, e, "down")] = down.contiguous()
    return out


# ---------------------------------------------------------------- the base's own tensors
def _weight_index(base_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model folder (sharded or not)."""
    idx = base_dir / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text(encoding="utf-8")).get("weight_map", {})
        return {k: base_dir / v for k, v in wm.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def _fp8_block(base_dir: Path) -> tuple[int, int] | None:
    """The FP8 block of a base folder's config.json (DeepSeek-V3/R1 as shipped), or None for a BF16/FP32 base."""
    from dsft.model.fp8 import block_size_of

    cfg = base_dir / "config.json"
    return block_size_of(json.loads(cfg.read_text(encoding="utf-8"))) if cfg.is_file() else None


def base_tensors_sha256(base_dir: str | Path, names: list[str], *, dequantize_to: str | None = None) -> str:
    """sha256 over the base folder's stored bytes of `names` (in that order): the identity a delta checks.
    With `dequantize_to` (a torch dtype name), FP8 tensors are first dequantized with their `weight_scale_inv`
    (dsft.model.fp8) to that dtype: the bytes of the BF16/FP32 copy a delta for an FP8 base was trained on."""
    import torch
    from safetensors import safe_open

    from dsft.model.fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize

    base = Path(base_dir)
    where = _weight_index(base)
    missing = [n for n in names if n not in where]
    if missing:
        raise ModelError(f"{base_dir}: the base has no tensor {missing[0]} (is it the model this delta was trained on?)")
    block = _fp8_block(base) if dequantize_to else None
    h = hashlib.sha256()
    for n in names:
        with safe_open(str(where[n]), "pt") as sf:
            t = sf.get_tensor(n)
        if block and t.dtype == FP8_DTYPE and n + SCALE_SUFFIX in where:
            with safe_open(str(where[n + SCALE_SUFFIX]), "pt") as sf:
                t = dequantize(t, sf.get_tensor(n + SCALE_SUFFIX), block, dtype=getattr(torch, dequantize_to))
        h.update(n.encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn"}


def _stored_dtype(base_dir: Path, name: str) -> str:
    """The safetensors dtype code (F32, BF16, F8_E4M3 …) a base folder stores `name` in (header only)."""
    from safetensors import safe_open

    with safe_open(str(_weight_index(base_dir)[name]), "pt") as sf:
        return str(sf.get_slice(name).get_dtype())


# ---------------------------------------------------------------- write / read
def write_delta(out_dir: str | Path, tensors: dict[str, Any], meta: dict[str, Any], *, base_dir: str | Path) -> Path:
    """Write esft_delta.safetensors + esft_delta.json (with the base's sha256 over the replaced tensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    save_file({k: tensors[k].detach().cpu().contiguous() for k in names}, str(out / DELTA_FILE),
              metadata={"format": "pt", "dsft": FORMAT})
    dtype = _ST_DTYPES.get(_stored_dtype(Path(base_dir), names[0]), "float32") if names else "float32"
    doc = {"format": FORMAT, "base_model": str(Path(base_dir).resolve()),
           "base_sha256": base_tensors_sha256(base_dir, names), "base_dtype": dtype, "tensors": names,
           "bytes": (out / DELTA_FILE).stat().st_size, **meta}
    atomic_write_json(out / DELTA_JSON, doc)
    return out


def delta_dir(path: str | Path) -> Path:
    """The delta folder for a folder or its esft_delta.safetensors; one line when it is not a delta."""
    p = Path(path).expanduser()
    d = p.parent if p.is_file() else p
    if not (d / DELTA_FILE).is_file() or not (d / DELTA_JSON).is_file():
        raise ModelError(f"{p}: not an ESFT delta (expected a folder with {DELTA_FILE} and {DELTA_JSON})")
    return d


def read_delta_meta(path: str | Path) -> dict[str, Any]:
    """esft_delta.json of a delta folder (checked: format, base, tensor list)."""
    d = delta_dir(path)
    try:
        meta = json.loads((d / DELTA_JSON).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelError(f"{d / DELTA_JSON}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelError(f"{d / DELTA_JSON}: key 'format': expected {FORMAT!r}, got {str(got)[:80]!r}")
    for key in ("base_model", "base_sha256", "tensors"):
        if key not in meta:
            raise ModelError(f"{d / DELTA_JSON}: key '{key}' missing")
    return meta


def read_delta(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, esft_delta.json) of a delta folder."""
    from safetensors.torch import load_file

    meta = read_delta_meta(path)
    tensors = load_file(str(delta_dir(path) / DELTA_FILE))
    if sorted(tensors) != sorted(meta["tensors"]):
        raise ModelError(f"{delta_dir(path)}: {DELTA_FILE} does not hold the tensors {DELTA_JSON} lists")
    return tensors, meta


def check_base(base_dir: str | Path, meta: dict[str, Any], where: str) -> None:
    """Refuse a base whose replaced tensors are not the ones the delta was trained from."""
    base = Path(base_dir)
    if base_tensors_sha256(base, meta["tensors"]) == meta.get("base_sha256"):
        return
    if _fp8_block(base):  # an FP8 base: the delta was trained on its dequantized BF16/FP32 copy
        for dtype in dict.fromkeys([meta.get("base_dtype") or "bfloat16", "bfloat16", "float32"]):
            if base_tensors_sha256(base, meta["tensors"], dequantize_to=dtype) == meta.get("base_sha256"):
                return
    raise ModelError(f"{where}: this delta was trained on {meta.get('base_model')}; {base_dir} holds other "
                     f"weights for the experts it replaces (sha256 differs)")


# ---------------------------------------------------------------- apply in memory / merge on disk
def apply_delta(model, path: str | Path, *, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a delta's tensors into a loaded transformers model (fused 3-D experts included; into an FP8 base's
    e4m3 modules re-quantized into their blocks, as the FP8 merge writes them); returns its json.
    With `base_dir` (the folder the model was loaded from) the base is checked first."""
    import torch

    tensors, meta = read_delta(path)
    if base_dir is not None:
        check_base(base_dir, meta, str(path))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in tensors.items():
            mod = modules.get(name.removesuffix(".weight"))
            if getattr(mod, "is_fp8", False):  # an FP8 base kept e4m3 (dsft.model.fp8_load): re-quantize into its
                # blocks exactly as `dsft esft merge --base FP8_BASE` writes them, so both serve the same weights
                from dsft.model.fp8 import quantize

                if tuple(t.shape) != (mod.out_features, mod.in_features):
                    raise ModelError(f"{path}: {name} has shape {tuple(t.shape)}, the model's "
                                     f"{(mod.out_features, mod.in_features)}")
                mod.set_fp8(*quantize(t.float(), mod.block))
                continue
            m = _EXPERT_KEY.match(name)
            if m is None:
                _target(params, name, tuple(t.shape), path).copy_(t)
                continue
            e, part = int(m["e"]), m["part"]
            fused = _target(params, f"{m['mod']}.{'down_proj' if part == 'down' else 'gate_up_proj'}", None, path)
            row = fused[e]
            if part != "down":
                half = row.shape[0] // 2
                row = row[:half] if part == "gate" else row[half:]
            if tuple(row.shape) != tuple(t.shape):
                raise ModelError(f"{path}: {name} has shape {tuple(t.shape)}, the model's expert {tuple(row.shape)}")
            row.copy_(t)
    return meta


def _target(params: dict, name: str, shape: tuple | None, path):
    if name not in params:
        raise ModelError(f"{path}: the model has no parameter {name} (another architecture than the delta's base?)")
    p = params[name]
    if shape is not None and tuple(p.shape) != shape:
        raise ModelError(f"{path}: {name} has shape {shape}, the model's {tuple(p.shape)}")
    return p


def _replacements(base: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """{stored name: tensor} the merge writes: each delta tensor in the dtype the base stores it in; into an FP8
    base's FP8 weights re-quantized into its blocks, each with its new `weight_scale_inv` (dsft.model.fp8)."""
    import torch

    from dsft.model.fp8 import SCALE_SUFFIX, quantize

    block = _fp8_block(base)
    where = _weight_index(base)
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        stored = _stored_dtype(base, name)
        if block and stored == "F8_E4M3":
            if name + SCALE_SUFFIX not in where:
                raise ModelError(f"{base}: FP8 tensor {name} has no {name + SCALE_SUFFIX} in the base")
            out[name], out[name + SCALE_SUFFIX] = quantize(t.float(), block)
        else:
            out[name] = t.to(getattr(torch, _ST_DTYPES.get(stored, "float32")))
    return out


def merge_into_folder(base_dir: str | Path, path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """base folder + delta → out_dir, one safetensors shard at a time (memory: the largest shard + the delta); every
    other file of the base (shard index, config, tokenizer) is copied. Delta tensors take the dtype of the base
    tensors they replace; into an FP8 base they are re-quantized into its blocks. Returns a summary."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, out = Path(base_dir), Path(out_dir)
    tensors, meta = read_delta(path)
    check_base(base, meta, str(path))
    new = _replacements(base, tensors)
    out.mkdir(parents=True, exist_ok=True)
    replaced: set[str] = set()
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            shard_meta = sf.metadata() or {"format": "pt"}
            shard = {}
            for k in sf.keys():
                if k in new:
                    shard[k] = new[k]
                    replaced.add(k)
                else:
                    shard[k] = sf.get_tensor(k)
        save_file(shard, str(out / f.name), metadata=shard_meta)
        del shard
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    if len(replaced) != len(new):
        raise ModelError(f"{base}: only {len(replaced)} of the {len(new)} tensors to replace were found in the base")
    return {"merged": str(out), "replaced_tensors": len(tensors), "base_model": str(base),
            "delta": str(delta_dir(path)), "experts": meta.get("experts"), "fp8": bool(_fp8_block(base))}


def merge_delta(delta: str | Path, out_dir: str | Path, *, base: str | Path | None = None,
                force: bool = False) -> dict[str, Any]:
    """`dsft esft merge`: the delta's own base (or `base`) + delta → out_dir (refusing a non-empty one unless force)."""
    from dsft.model.load import resolve_model_dir

    meta = read_delta_meta(delta)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ModelError(f"{out} already exists and is not empty; pass --force to overwrite it")
    base_dir = resolve_model_dir(str(base or meta["base_model"]))
    if out.resolve() == base_dir.resolve():
        raise ModelError(f"{out}: the output folder is the base itself; choose another folder")
    return merge_into_folder(base_dir, delta, out)


def copy_delta(delta: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Copy a delta folder (checked) to out_dir → the export manifest's keys (`esft_delta`, `esft_delta_bytes`)."""
    src = delta_dir(delta)
    read_delta_meta(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (DELTA_FILE, DELTA_JSON):
        shutil.copy2(src / name, out / name)
    return {"esft_delta": out.name, "esft_delta_bytes": (out / DELTA_FILE).stat().st_size}
