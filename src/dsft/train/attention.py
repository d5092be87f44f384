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


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     position_ids=None, **kwargs):
    """query (B, H, L, Dq), key (B, Hk, L, Dq), value (B, Hk, L, Dv) → ((B, L, H, Dv), None)."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    if position_ids is None or attention_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for b in range(query.shape[0]):
        bounds = _segments(position_ids[b])
        parts = [
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           is_causal=True, dropout_p=dropout, scale=scaling)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s
        ]
        rows.append(torch.cat(parts, dim=2))
    out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


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
