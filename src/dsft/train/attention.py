"""Packed-sequence attention that costs Σ Lᵢ² instead of L²: SDPA run per packed sample (CPU training path).

With packing, transformers' sdpa/eager path builds a block-diagonal mask over the whole packed row and the
kernel still computes every (query, key) pair of the row, then masks most of them away: on CPU, rows of
512 tokens holding four samples cost ~4× the attention of the samples alone. `dsft_packed` splits each row
at the positions where position ids restart and runs causal SDPA on every sample by itself, so no sample
can see another (by construction) and padding at a row's end is its own segment. Registered with
transformers' AttentionInterface; no mask is built for it (none is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "dsft_packed"


def _segments(pos: torch.Tensor) -> list[int]:
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, pos.numel()]


def _length_groups(position_ids: torch.Tensor) -> list[torch.Tensor]:
    """The packed samples of all rows grouped by length: per length, a (samples, length) tensor of their token
    indices into the flattened (rows × row length) batch."""
    B, L = position_ids.shape
    starts: dict[int, list[int]] = {}
    for b in range(B):
        bounds = _segments(position_ids[b])
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            if e > s:
                starts.setdefault(e - s, []).append(b * L + s)
    dev = position_ids.device
    return [torch.tensor(v, device=dev)[:, None] + torch.arange(n, device=dev) for n, v in sorted(starts.items())]


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     position_ids=None, **kwargs):
    """query (B, H, L, Dq), key (B, Hk, L, Dq), value (B, Hk, L, Dv) → ((B, L, H, Dv), None).

    Samples of equal length (in any row) run as one batched causal SDPA call: a step of GRPO rollouts or of
    similar-length SFT samples costs a few kernel calls per layer instead of one per sample."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    if position_ids is None or attention_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    B, H, L, _ = query.shape
    if key.shape[2] != L:  # a decode step over a KV cache: this kernel only knows whole packed rows
        raise RuntimeError(f"{NAME} attention is for packed training forwards (query and key of one length), got "
                           f"{L} queries over {key.shape[2]} keys: generate with the model's own attention "
                           f"(dsft.train.objectives.rollout.generation_mode)")
    q, k, v = (t.transpose(1, 2).reshape(B * L, H, t.shape[-1]) for t in (query, key, value))
    parts, order = [], []
    for idx in _length_groups(position_ids):
        n, span = idx.shape
        o = F.scaled_dot_product_attention(*(t[idx].transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                           dropout_p=dropout, scale=scaling)  # (n, H, span, Dv)
        parts.append(o.transpose(1, 2).reshape(n * span, H, -1))
        order.append(idx.flatten())
    pos = torch.cat(order)
    inverse = torch.empty_like(pos)
    inverse[pos] = torch.arange(pos.numel(), device=pos.device)
    return torch.cat(parts)[inverse].view(B, L, H, -1), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME


def use_packed_attention(model) -> str | None:
    """Switch the model to per-sample attention; returns the previous implementation (to restore before saving)."""
    inner = model
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    prev = inner.config._attn_implementation
    register()
    inner.set_attn_implementation(NAME)
    return prev
