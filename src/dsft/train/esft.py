"""ESFT training: split the selected routed experts out of transformers' fused 3-D expert tensors and train only them.

transformers 5 stores a MoE layer's routed experts as two fused parameters, `mlp.experts.gate_up_proj` (E, 2I, H)
and `mlp.experts.down_proj` (E, H, I). `split_out` freezes both and gives the experts module trainable copies of
the selected experts' rows only (`esft_gate_up_proj` (k, 2I, H), `esft_down_proj` (k, H, I)): the frozen experts
still run through transformers' own experts kernel (with the selected experts' routing weights zeroed), the
selected ones in a loop over their trainable copies. So gradients and AdamW state exist for the selected experts
only, the router and every other tensor stay bitwise unchanged, and `merge_back` writes the trained rows into the
fused tensors again (the result is a plain transformers model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsft.errors import TrainError
from dsft.train.setup import is_router

_MLP_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")
TRAINED_GATE_UP = "esft_gate_up_proj"
TRAINED_DOWN = "esft_down_proj"


@dataclass
class MoeLayer:
    """One MoE layer of a transformers DeepSeek-style model: its MLP module (router `gate` + fused `experts`)."""

    index: int
    name: str
    mlp: nn.Module
    n_experts: int
    top_k: int

    @property
    def experts(self) -> nn.Module:
        return self.mlp.experts


@dataclass
class Selection:
    """What ESFT trains: {layer index: routed expert ids} + the paper's two ablation switches."""

    experts: dict[int, list[int]]
    shared_experts: bool = False
    non_expert_modules: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """How the selection was made (score function, top_p, profile file) — recorded in manifests."""

    def count(self) -> int:
        return sum(len(v) for v in self.experts.values())


def moe_layers(model) -> list[MoeLayer]:
    """The MoE layers of a model (any wrapper peeled), in layer order; [] for a dense model."""
    inner = getattr(model, "module", model)
    out = []
    for name, mod in inner.named_modules():
        m = _MLP_NAME.search(name)
        experts, gate = getattr(mod, "experts", None), getattr(mod, "gate", None)
        if m is None or experts is None or gate is None:
            continue
        gu = getattr(experts, "gate_up_proj", None)
        if not isinstance(gu, torch.Tensor) or gu.ndim != 3 or not hasattr(experts, "down_proj"):
            continue
        top_k = int(getattr(gate, "top_k", 0) or getattr(getattr(mod, "config", None), "num_experts_per_tok", 0))
        out.append(MoeLayer(index=int(m.group(1)), name=name, mlp=mod, n_experts=int(gu.shape[0]), top_k=top_k))
    return sorted(out, key=lambda layer: layer.index)


def require_moe(model, where: str) -> list[MoeLayer]:
    layers = moe_layers(model)
    if not layers:
        mtype = getattr(getattr(model, "config", None), "model_type", "?")
        raise TrainError(f"{where}: model_type '{mtype}' has no routed experts with fused 3-D weights "
                         f"(mlp.experts.gate_up_proj); ESFT needs a DeepSeek MoE model (V2, V2-Lite, V3, R1)")
    return layers


def check_selection(layers: list[MoeLayer], sel: Selection, where: str) -> None:
    """Every named layer is a MoE layer and every expert id exists there (one line otherwise)."""
    by_index = {layer.index: layer for layer in layers}
    for li, experts in sel.experts.items():
        if li not in by_index:
            raise TrainError(f"{where}: layer {li} is not a MoE layer (MoE layers: {sorted(by_index)})")
        bad = [e for e in experts if not 0 <= e < by_index[li].n_experts]
        if bad:
            raise TrainError(f"{where}: layer {li}: expert {bad[0]} does not exist "
                             f"(routed experts 0–{by_index[li].n_experts - 1})")


# ---------------------------------------------------------------- split out / merge back
def _esft_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """Frozen experts through the class's own kernel (selected slots weighted 0), trained experts in a loop."""
    selected = self.esft_selected_mask[top_k_index]  # (tokens, top_k) bool
    out = type(self).__mro__[1].forward(self, hidden_states, top_k_index, top_k_weights.masked_fill(selected, 0.0))
    for slot, expert in enumerate(self.esft_experts):
        tok, pos = torch.where(top_k_index == expert)
        gate_up, down = getattr(self, TRAINED_GATE_UP)[slot], getattr(self, TRAINED_DOWN)[slot]
        if tok.numel() == 0:  # keep a (zero) gradient: AdamW sees every selected expert at every step, as full FT
            out = out + 0.0 * (gate_up.sum() + down.sum()).to(out.dtype)
            continue
        gate, up = F.linear(hidden_states[tok], gate_up).chunk(2, dim=-1)
        h = F.linear(self.act_fn(gate) * up, down) * top_k_weights[tok, pos, None]
        out = out.index_add(0, tok, h.to(out.dtype))
    return out


_ESFT_CLASSES: dict[type, type] = {}


def _esft_class(cls: type) -> type:
    """A subclass of the experts class whose forward is `_esft_forward` (one per class, cached)."""
    if cls not in _ESFT_CLASSES:
        _ESFT_CLASSES[cls] = type(f"Esft{cls.__name__}", (cls,), {"forward": _esft_forward})
    return _ESFT_CLASSES[cls]


def split_out(layer: MoeLayer, experts: list[int]) -> int:
    """Freeze the layer's fused expert tensors and add trainable copies of `experts`' rows; returns their size."""
    ex = layer.experts
    if getattr(ex, "esft_experts", None) is not None:
        raise TrainError(f"{layer.name}: ESFT experts are already split out")
    idx = torch.tensor(sorted(experts), dtype=torch.long, device=ex.gate_up_proj.device)
    ex.gate_up_proj.requires_grad_(False)
    ex.down_proj.requires_grad_(False)
    ex.esft_experts = [int(e) for e in idx.tolist()]
    mask = torch.zeros(layer.n_experts + 1, dtype=torch.bool, device=idx.device)  # + the "no expert" index E
    mask[idx] = True
    ex.register_buffer("esft_selected_mask", mask, persistent=False)
    ex.register_parameter(TRAINED_GATE_UP, nn.Parameter(ex.gate_up_proj.detach()[idx].clone()))
    ex.register_parameter(TRAINED_DOWN, nn.Parameter(ex.down_proj.detach()[idx].clone()))
    ex.__class__ = _esft_class(type(ex))
    return getattr(ex, TRAINED_GATE_UP).numel() + getattr(ex, TRAINED_DOWN).numel()


def merge_back(model) -> int:
    """Write every split-out expert's trained rows into the fused tensors and restore the plain experts class;
    returns the number of layers merged. Rows of experts that were not selected are not touched."""
    n = 0
    for layer in moe_layers(model):
        ex = layer.experts
        if getattr(ex, "esft_experts", None) is None:
            continue
        idx = torch.tensor(ex.esft_experts, dtype=torch.long, device=ex.gate_up_proj.device)
        with torch.no_grad():
            ex.gate_up_proj[idx] = getattr(ex, TRAINED_GATE_UP).detach().to(ex.gate_up_proj.dtype)
            ex.down_proj[idx] = getattr(ex, TRAINED_DOWN).detach().to(ex.down_proj.dtype)
        del ex._parameters[TRAINED_GATE_UP], ex._parameters[TRAINED_DOWN], ex._buffers["esft_selected_mask"]
        del ex.esft_experts
        ex.__class__ = type(ex).__mro__[1]
        n += 1
    return n


def trained_rows(model) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, expert): (gate_up (2I, H), down (H, I))} of the split-out experts, detached on the CPU."""
    out = {}
    for layer in moe_layers(model):
        ex = layer.experts
        for slot, e in enumerate(getattr(ex, "esft_experts", None) or []):
            out[(layer.index, e)] = (getattr(ex, TRAINED_GATE_UP)[slot].detach().cpu(),
                                     getattr(ex, TRAINED_DOWN)[slot].detach().cpu())
    return out


# ---------------------------------------------------------------- the method
def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def apply_esft(model, sel: Selection, where: str = "train.method esft") -> dict[str, Any]:
    """Freeze everything, split out the selected experts (+ shared experts / non-expert modules when asked);
    returns the manifest's method info (experts per layer, counts)."""
    layers = require_moe(model, where)
    check_selection(layers, sel, where)
    for p in model.parameters():
        p.requires_grad = False
    expert_params = 0
    for layer in layers:
        if sel.experts.get(layer.index):
            expert_params += split_out(layer, sel.experts[layer.index])
    for n, p in model.named_parameters():
        if is_router(n) or _is_routed_expert(n) or n.endswith((TRAINED_GATE_UP, TRAINED_DOWN)):
            continue
        if (sel.shared_experts and ".shared_experts." in n) or \
                (sel.non_expert_modules and ".shared_experts." not in n):
            p.requires_grad = True
    total_routed = sum(layer.n_experts for layer in layers)
    return {"experts": {str(k): v for k, v in sorted(sel.experts.items())}, "selected_experts": sel.count(),
            "routed_experts": total_routed, "expert_params": expert_params,
            "train_shared_experts": sel.shared_experts, "train_non_expert_modules": sel.non_expert_modules,
            **sel.info}


def selection_from_config(ecfg) -> Selection | None:
    """The config's explicit `esft.experts`, else None (then the profile chooses)."""
    if ecfg.experts is None:
        return None
    return Selection(experts={int(k): sorted(set(v)) for k, v in ecfg.experts.items()},
                     shared_experts=ecfg.train_shared_experts, non_expert_modules=ecfg.train_non_expert_modules,
                     info={"selected_by": "esft.experts"})


def describe(sel: Selection, layers: list[MoeLayer]) -> list[str]:
    """One line per MoE layer: the experts chosen of how many."""
    return [f"  layer {layer.index:>3}: {len(sel.experts.get(layer.index, [])):>3}/{layer.n_experts} experts "
            f"{sel.experts.get(layer.index, [])}" for layer in layers]
