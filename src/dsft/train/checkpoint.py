"""Atomic, verifiable training checkpoints: trainable weights, optimizer, schedule, RNG, data position.

Layout of `checkpoints/checkpoint-<step>/` (safetensors + JSON only, no pickle):
  trainable.safetensors   every parameter with requires_grad (LoRA, modules_to_save, or the full model)
  optimizer.safetensors   AdamW state tensors, keyed `<param name>.<state key>`
  rng.safetensors         torch CPU (+ CUDA) generator states
  state.json              step, schedule, data position, effective batch, dataset fingerprint, python RNG, …
  COMPLETE                sha256 + size of each file above, written last
Written into `.tmp-checkpoint-<step>` and renamed into place, so a crash leaves either the previous
checkpoint or a temp folder (ignored). A folder whose COMPLETE is missing or does not match is torn.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsft.errors import TrainError
from dsft.run import sha256_file

log = logging.getLogger("dsft.train")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            out[f"{names[id(p)]}.{k}"] = t.detach().to("cpu").contiguous().clone()
    return out


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def restore_rng(tensors: dict[str, torch.Tensor], py: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    if py.get("python"):
        a, b, c = py["python"]
        random.setstate((a, tuple(b), c))


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
                    state: dict[str, Any], *, keep: int) -> Path:
    """Write checkpoint-<step> atomically, then keep only the newest `keep` complete ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"checkpoint-{step}"
    tmp = ckpt_root / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    save_file(optim, str(tmp / "optimizer.safetensors"))
    rng_t, rng_py = rng_state()
    save_file(rng_t, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_py}, indent=1), encoding="utf-8")
    manifest = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in FILES}
    for f in FILES:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    with open(tmp / "COMPLETE", "w", encoding="utf-8") as fh:
        json.dump(manifest, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep)
    return final


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    marker = path / "COMPLETE"
    if not marker.exists():
        return "no COMPLETE marker (crash while saving)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable COMPLETE marker"
    for f in FILES:
        p = path / f
        if not p.exists():
            return f"{f} missing"
        info = manifest.get(f) or {}
        if p.stat().st_size != info.get("bytes") or sha256_file(p) != info.get("sha256"):
            return f"{f} does not match its checksum"
    return None


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.exists():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid(ckpt_root: Path) -> Path | None:
    """The newest intact checkpoint; torn ones are reported and skipped."""
    for _step, p in reversed(list_checkpoints(ckpt_root)):
        why = verify(p)
        if why is None:
            return p
        log.warning("dsft train: checkpoint %s is torn (%s); using an earlier one", p.name, why)
    return None


def prune(ckpt_root: Path, keep: int) -> None:
    good = [p for _, p in list_checkpoints(ckpt_root) if verify(p) is None]
    for p in good[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def _shard_like(param, t: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `param` (a DTensor shard under FSDP2), else `t` as is."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.dtype), mesh, param.placements)


def _copy_into(param, t: torch.Tensor) -> None:
    t = t.to(param.device, param.dtype)
    if getattr(param, "device_mesh", None) is not None:  # FSDP2: copy this rank's shard
        param.to_local().copy_(_shard_like(param, t).to_local())
    else:
        param.copy_(t)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; one line (TrainError) when it is not one, even if its checksum matched."""
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError (bad header / data), OSError
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise TrainError(f"{path}: not a readable safetensors file ({msg}); resume from another checkpoint") from None


def load_checkpoint(path: Path, model, opt, names: dict[int, str]) -> dict[str, Any]:
    """Restore trainable weights, optimizer state and RNG; return state.json."""
    weights = _load_tensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks trainable parameter {missing[0]} (different method or targets?)")
    with torch.no_grad():
        for n, t in weights.items():
            _copy_into(params[n], t)
    opt_t = _load_tensors(path / "optimizer.safetensors")
    if not opt_t:
        log.warning("dsft train: %s holds no optimizer state (sharded run): AdamW moments restart", path.name)
    by_name = {v: k for k, v in names.items()}
    id_to_param = {id(p): p for g in opt.param_groups for p in g["params"]}
    opt.state.clear()
    for key, t in opt_t.items():
        pname, _, sk = key.rpartition(".")
        p = id_to_param[by_name[pname]]
        dev = "cpu" if sk == "step" else p.device
        opt.state[p][sk] = _shard_like(p, t.to(dev)) if sk != "step" else t.to(dev)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    restore_rng(_load_tensors(path / "rng.safetensors"), state.get("rng", {}))
    return state
