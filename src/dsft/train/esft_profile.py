"""ESFT step 1: run the base model over a sample of the task's data and score every routed expert per MoE layer.

Per layer l and routed expert e, over the N sampled tokens (prompt and answer; padding excluded), with K experts
per token and g_{e,t} the weight the router gives e for token t (0 when e is not among t's top-k; the router's
output divided by its `routed_scaling_factor`):

  token selection ratio  token[l][e] = #{t : e in top-k(t)} / (N · K)         (sums to 1 per layer)
  average gate score     gate_mean[l][e] = Σ_t g_{e,t} / N
  gate share             gate[l][e] = gate_mean[l][e] / Σ_e' gate_mean[l][e']    (sums to 1 per layer)

`token` and `gate` are what `esft.score` selects on; the routing entropy of `token` (0 = one expert takes every
token, 1 = uniform) says how specialised a layer's routing is on this data.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from dsft.train.esft import MoeLayer, require_moe

PROFILE_BATCH = 8


def sample_examples(token_lists: list[list[int]], sample_tokens: int, seed: int) -> list[list[int]]:
    """Seed-shuffled examples until `sample_tokens` tokens (the last one cut to fit exactly)."""
    order = list(range(len(token_lists)))
    random.Random(seed).shuffle(order)
    out, left = [], sample_tokens
    for i in order:
        if left <= 0:
            break
        ids = token_lists[i][:left]
        if ids:
            out.append(ids)
            left -= len(ids)
    return out


class _RouterTap:
    """Forward hooks on each MoE layer's router, accumulating top-k counts and gate weights of real tokens."""

    def __init__(self, layers: list[MoeLayer]):
        self.layers = layers
        self.counts = {layer.index: torch.zeros(layer.n_experts, dtype=torch.float64) for layer in layers}
        self.gates = {layer.index: torch.zeros(layer.n_experts, dtype=torch.float64) for layer in layers}
        self.mask: torch.Tensor | None = None  # (batch·seq,) True on real tokens
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: MoeLayer):
        scale = float(getattr(layer.mlp.gate, "routed_scaling_factor", 1.0) or 1.0)

        def hook(_mod, _inp, out):
            _, weights, idx = out
            keep = self.mask.to(idx.device)
            idx, w = idx[keep].reshape(-1).cpu(), weights[keep].reshape(-1).double().cpu() / scale
            self.counts[layer.index] += torch.bincount(idx, minlength=layer.n_experts).double()
            self.gates[layer.index] += torch.bincount(idx, weights=w, minlength=layer.n_experts)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def profile_experts(model, token_lists: list[list[int]], *, sample_tokens: int, seed: int,
                    pad_id: int = 0) -> dict[str, Any]:
    """Scores of every routed expert of every MoE layer on a sample of `token_lists` (see the module docstring)."""
    layers = require_moe(model, "esft profile")
    sample = sample_examples(token_lists, sample_tokens, seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tap = _RouterTap(layers)
    try:
        for b in range(0, len(sample), PROFILE_BATCH):
            chunk = sample[b:b + PROFILE_BATCH]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
            tap.mask = mask.reshape(-1).bool()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        tap.close()
        model.train(was_training)
    n_tokens = sum(len(x) for x in sample)
    return {"tokens": n_tokens, "examples": len(sample), "sample_tokens": sample_tokens, "seed": seed,
            "layers": {str(layer.index): _layer_scores(layer, tap.counts[layer.index], tap.gates[layer.index], n_tokens)
                       for layer in layers}}


def _layer_scores(layer: MoeLayer, counts: torch.Tensor, gates: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    slots = max(1.0, float(counts.sum()))
    token = (counts / slots).tolist()
    gate_mean = (gates / max(1, n_tokens)).tolist()
    total = float(gates.sum())
    gate = [g / total if total > 0 else 0.0 for g in gates.tolist()]
    return {"n_experts": layer.n_experts, "top_k": layer.top_k, "token": token, "gate": gate, "gate_mean": gate_mean,
            "routing_entropy": routing_entropy(token)}


def routing_entropy(shares: list[float]) -> float:
    """Entropy of a layer's expert shares, divided by log(E): 0 = one expert takes everything, 1 = uniform."""
    h = -sum(p * math.log(p) for p in shares if p > 0)
    return h / math.log(len(shares)) if len(shares) > 1 else 0.0


def heatmap(scores: dict[str, Any], score: str, selected: dict[int, list[int]], path: Path) -> Path:
    """PNG: MoE layers × routed experts, coloured by the chosen score, selected experts boxed."""
    from dsft.report.plots import pyplot, save_png

    plt = pyplot()
    layer_ids = sorted(scores["layers"], key=int)
    rows = [scores["layers"][li][score] for li in layer_ids]
    n_exp = max(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(min(18, max(7.0, 3 + 0.25 * n_exp)), min(14, max(3.0, 1.5 + 0.35 * len(rows)))))
    im = ax.imshow([r + [0.0] * (n_exp - len(r)) for r in rows], aspect="auto", cmap="viridis")
    for y, li in enumerate(layer_ids):
        for e in selected.get(int(li), []):
            ax.add_patch(plt.Rectangle((e - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_yticks(range(len(layer_ids)), [f"layer {li}" for li in layer_ids])
    ax.set_xlabel("routed expert")
    ax.set_title(f"ESFT expert scores ({score}; selected experts boxed), {scores['tokens']:,} tokens", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the layer")
    return save_png(fig, path)
