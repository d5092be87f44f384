"""Model FLOPs per trained token (the time-per-epoch and multi-GPU models start from these)."""

from __future__ import annotations

from dsft.plan.request import PlanRequest


def forward_flops_per_token(req: PlanRequest) -> float:
    """2N over the active parameters plus causal attention (half of 2·S·heads·(qk+v) per layer, ×2 for QK and PV)."""
    a = req.arch
    n = a.active_params()
    qk = (a.qk_nope_head_dim + a.qk_rope_head_dim) if a.mla else a.hd
    v = a.v_head_dim if a.mla else a.hd
    attn_fwd = a.layers * req.seq_len * a.heads * (qk + v)  # causal: half of 2·S·heads·(qk+v)
    return 2.0 * n + 2 * attn_fwd


def train_flops_per_token(req: PlanRequest) -> float:
    """Model FLOPs per trained token: 2N forward, 2N input-gradients, 2N weight-gradients (full only), + attention;
    gradient checkpointing runs the forward once more."""
    a = req.arch
    passes = 6.0 if req.method == "full" else 4.0
    if req.method == "freeze":
        passes = 4.0 + 2.0 * min(req.freeze_layers, a.layers) / a.layers
    fwd = forward_flops_per_token(req)
    total = passes / 2 * fwd
    if req.gradient_checkpointing:
        total += fwd
    return total
