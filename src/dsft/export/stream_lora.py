"""Map a PEFT LoRA/DoRA adapter folder onto a checkpoint's tensor names, and compute each merged tensor.

What `dsft train` (PEFT 0.21, transformers 5) saves, and the base tensor each entry lands on:

- `base_model.model.<module>.lora_A.weight` (r × in) / `.lora_B.weight` (out × r) on an `nn.Linear` → `<module>.weight`;
  ΔW = (B @ A) · scaling, scaling = alpha / r (alpha / √r with rslora). DoRA adds `<module>.lora_magnitude_vector` (m):
  W' = m / ‖W + ΔW‖_row · (W + ΔW), as PEFT merges it.
- transformers 5 fuses each MoE layer's routed experts into 3-D parameters `mlp.experts.gate_up_proj` (E, 2I, H) and
  `down_proj` (E, H, I); PEFT adapts them as `target_parameters`, saved under `<layer>.mlp.experts[.base_layer…]`
  with A of shape (r·E, in) and B (out, r·E), nested wrappers told apart by these shapes. Expert e's delta is
  B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e] · scaling; rows [0, I) of gate_up are the shipped
  `experts.e.gate_proj.weight`, rows [I, 2I) `experts.e.up_proj.weight` (transformers' own conversion).
  The fused delta (E · out · in) is never built: one expert at a time.
- any other entry (`modules_to_save`: embeddings, LM head, norms) replaces the base tensor of that name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.errors import ExportError
from dsft.export.stream_io import TensorInfo, read_header, read_tensor

PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
MAG_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
REFUSED_MARKERS = ("lora_embedding_", "lora_bias", ".lora_E", "lora_ranknum")


@dataclass(frozen=True)
class Factor:
    """One adapted module or fused expert parameter: adapter keys of A and B, experts (1 for a Linear), scaling."""

    a_key: str
    b_key: str
    scaling: float
    experts: int = 1
    magnitude_key: str | None = None


@dataclass(frozen=True)
class Edit:
    """What the merge does to one base tensor: add a LoRA delta (maybe one expert's rows of it) or replace it."""

    kind: str  # "lora" | "replace"
    factor: Factor | None = None
    expert: int | None = None  # fused experts: which expert
    rows: tuple[int, int] | None = None  # fused gate_up: which rows of the expert's delta
    fused_layout: str | None = None  # a fused 3-D base tensor: "oi" (E, out, in) or "io" (E, in, out)
    replace_key: str | None = None


class AdapterTensors:
    """The adapter's safetensors file, read one tensor at a time (float32), with a cache the caller clears."""

    def __init__(self, adapter_dir: Path) -> None:
        self.path = Path(adapter_dir) / "adapter_model.safetensors"
        self.infos, _ = read_header(self.path)
        self._cache: dict[str, torch.Tensor] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def get(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            with open(self.path, "rb") as fh:
                self._cache[key] = read_tensor(fh, self.infos[key]).float()
        return self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


def _scaling(cfg: dict[str, Any], r: int) -> float:
    alpha = float(cfg.get("lora_alpha") or 8)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    """Refuse adapter options whose merge the stream path does not implement (dsft never writes them)."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(f"{where}: peft_type {cfg.get('peft_type')!r}: the streaming merge handles LoRA and DoRA only")
    for key in ("alpha_pattern", "trainable_token_indices", "lora_bias", "fan_in_fan_out", "layer_replication"):
        if cfg.get(key):
            raise ExportError(f"{where}: adapter_config key {key!r} = {str(cfg[key])[:200]} is not supported by the "
                              f"streaming merge (dsft does not set it)")


def _group_keys(keys: list[str], where: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({wrapper path: {A, B, M}}, {base tensor name: adapter key}) from the adapter's tensor names."""
    wrappers: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(PREFIX)
        if any(m in name for m in REFUSED_MARKERS):
            raise ExportError(f"{where}: adapter tensor {key!r} is of a LoRA kind the streaming merge does not handle")
        for suffix, slot in ((A_SUFFIX, "A"), (B_SUFFIX, "B"), *((s, "M") for s in MAG_SUFFIXES)):
            if name.endswith(suffix):
                wrappers.setdefault(name[: -len(suffix)], {})[slot] = key
                break
        else:
            replaced[name] = key
    for path, slots in wrappers.items():
        if "A" not in slots or "B" not in slots:
            raise ExportError(f"{where}: adapter module {path!r} has lora_{'B' if 'A' in slots else 'A'} missing")
    return wrappers, replaced


def _expert_ids(module: str, base: dict[str, TensorInfo]) -> list[int]:
    """Expert indices e with `<module>.e.gate_proj.weight` in the base (shipped per-expert layout)."""
    prefix = f"{module}."
    ids = set()
    for name in base:
        if name.startswith(prefix) and name.endswith(".gate_proj.weight"):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                ids.add(int(head))
    return sorted(ids)


def _plan_linear(module: str, factor: Factor, a: tuple, b: tuple, base: dict[str, TensorInfo], where: Path
                 ) -> dict[str, Edit]:
    target = f"{module}.weight"
    shape = base[target].shape
    if len(shape) != 2 or (b[0], a[1]) != tuple(shape):
        raise ExportError(f"{where}: LoRA on {module!r} is (out {b[0]}, in {a[1]}) but base tensor {target!r} has "
                          f"shape {tuple(shape)}")
    return {target: Edit("lora", factor)}


def _plan_experts(module: str, slots: dict[str, str], cfg: dict, ad: AdapterTensors, base: dict[str, TensorInfo],
                  where: Path) -> dict[str, Edit]:
    """Edits of one fused-expert LoRA (gate_up_proj or down_proj, told apart by shape) on per-expert or fused tensors."""
    a, b = ad.shape(slots["A"]), ad.shape(slots["B"])
    out, inp = b[0], a[1]
    if "M" in slots:
        raise ExportError(f"{where}: DoRA on fused experts {module!r}: PEFT does not support it, nor does the merge")
    ids = _expert_ids(module, base)
    if ids:
        n = len(ids)
        gate = base[f"{module}.{ids[0]}.gate_proj.weight"].shape
        down = base[f"{module}.{ids[0]}.down_proj.weight"].shape
        if ids != list(range(n)) or a[0] % n or b[1] != a[0]:
            raise ExportError(f"{where}: LoRA on {module!r}: A {a} / B {b} do not fit the base's {n} experts")
        factor = Factor(slots["A"], slots["B"], _scaling(cfg, a[0] // n), n)
        if (out, inp) == (2 * gate[0], gate[1]):
            inter = gate[0]
            return {**{f"{module}.{e}.gate_proj.weight": Edit("lora", factor, e, (0, inter)) for e in ids},
                    **{f"{module}.{e}.up_proj.weight": Edit("lora", factor, e, (inter, 2 * inter)) for e in ids}}
        if (out, inp) == tuple(down):
            return {f"{module}.{e}.down_proj.weight": Edit("lora", factor, e) for e in ids}
        raise ExportError(f"{where}: LoRA on {module!r} is (out {out}, in {inp}); it fits neither gate_up "
                          f"({2 * gate[0]}, {gate[1]}) nor down {tuple(down)} of the base's experts")
    for pname in ("gate_up_proj", "down_proj"):  # a base saved with fused 3-D experts
        info = base.get(f"{module}.{pname}")
        if info is None or len(info.shape) != 3:
            continue
        n, d1, d2 = info.shape
        layout = "oi" if (d1, d2) == (out, inp) else "io" if (d1, d2) == (inp, out) else None
        if layout and a[0] % n == 0 and b[1] == a[0]:
            return {info.name: Edit("lora", Factor(slots["A"], slots["B"], _scaling(cfg, a[0] // n), n),
                                    fused_layout=layout)}
    raise ExportError(f"{where}: LoRA on {module!r} matches no base tensor (neither {module}.0.gate_proj.weight … "
                      f"nor fused {module}.gate_up_proj / down_proj)")


def plan_edits(adapter_dir: str | Path, adapter_cfg: dict[str, Any], base: dict[str, TensorInfo],
               ad: AdapterTensors) -> dict[str, Edit]:
    """{base tensor name: Edit} for every adapter entry; one-line ExportError for anything that does not map."""
    where = Path(adapter_dir)
    _check_config(adapter_cfg, where)
    wrappers, replaced = _group_keys(list(ad.infos), where)
    edits: dict[str, Edit] = {}

    def put(new: dict[str, Edit], source: str) -> None:
        for name, edit in new.items():
            if name in edits:
                raise ExportError(f"{where}: base tensor {name!r} is changed twice (again by {source!r})")
            edits[name] = edit

    for path, slots in sorted(wrappers.items()):
        module = path.replace(".base_layer", "")
        a, b = ad.shape(slots["A"]), ad.shape(slots["B"])
        if f"{module}.weight" in base:
            if a[0] != b[1]:
                raise ExportError(f"{where}: {path!r}: lora_A {a} and lora_B {b} disagree on the rank")
            factor = Factor(slots["A"], slots["B"], _scaling(adapter_cfg, a[0]), 1, slots.get("M"))
            put(_plan_linear(module, factor, a, b, base, where), slots["A"])
        else:
            put(_plan_experts(module, slots, adapter_cfg, ad, base, where), slots["A"])
    for name, key in sorted(replaced.items()):
        if name not in base:
            raise ExportError(f"{where}: adapter tensor {key!r} (modules_to_save) has no base tensor {name!r}")
        if tuple(ad.shape(key)) != tuple(base[name].shape):
            raise ExportError(f"{where}: adapter tensor {key!r} has shape {ad.shape(key)}, base {name!r} "
                              f"{base[name].shape}")
        put({name: Edit("replace", replace_key=key)}, key)
    return edits


def _expert_delta(f: Factor, ad: AdapterTensors, e: int, rows: tuple[int, int] | None) -> torch.Tensor:
    """Expert e's delta in nn.Linear layout (out, in), optionally only rows [r0, r1) of it."""
    a, b = ad.get(f.a_key), ad.get(f.b_key)
    a_e = a.reshape(f.experts, -1, a.shape[-1])[e]  # (r, in)
    b_e = b.reshape(b.shape[0], -1, f.experts)[:, :, e]  # (out, r)
    if rows is not None:
        b_e = b_e[rows[0]:rows[1]]
    return (b_e @ a_e) * f.scaling


def merged_tensor(weight: torch.Tensor, edit: Edit, ad: AdapterTensors) -> torch.Tensor:
    """The base tensor (float32) with its edit applied, float32."""
    if edit.kind == "replace":
        return ad.get(edit.replace_key).float()
    f = edit.factor
    if edit.fused_layout is not None:
        deltas = [_expert_delta(f, ad, e, None) for e in range(f.experts)]
        delta = torch.stack([d if edit.fused_layout == "oi" else d.T for d in deltas])
        return weight + delta
    if f.experts > 1:
        return weight + _expert_delta(f, ad, edit.expert, edit.rows)
    delta = (ad.get(f.b_key) @ ad.get(f.a_key)) * f.scaling
    merged = weight + delta
    if f.magnitude_key is None:
        return merged
    norm = torch.linalg.norm(merged, dim=1)  # DoRA: PEFT's weight norm of W + ΔW, per output row
    return (ad.get(f.magnitude_key) / norm).view(-1, 1) * merged
