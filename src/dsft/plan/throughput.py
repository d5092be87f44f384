"""Model FLOPs per trained token, and GRPO's generation time (the time-per-epoch and multi-GPU models start here)."""

from __future__ import annotations

from dsft.plan.activations import kv_bytes_per_token
from dsft.plan.request import PlanRequest, base_weight_bytes

# Share of the HBM bandwidth a decode step reaches when it streams the weights and the KV cache (assumed).
DECODE_BANDWIDTH_EFFICIENCY = 0.7


def forward_flops_per_token(req: PlanRequest) -> float:
    """2N over the active parameters plus causal attention (half of 2·S·heads·(qk+v) per layer, ×2 for QK and PV)."""
    a = req.arch
    n = a.active_params()
    qk = (a.qk_nope_head_dim + a.qk_rope_head_dim) if a.mla else a.hd
    v = a.v_head_dim if a.mla else a.hd
    attn_fwd = a.layers * req.row_len * a.heads * (qk + v)  # causal: half of 2·S·heads·(qk+v)
    return 2.0 * n + 2 * attn_fwd


def train_flops_per_token(req: PlanRequest) -> float:
    """Model FLOPs per trained token: 2N forward, 2N input-gradients, 2N weight-gradients (full only), + attention;
    gradient checkpointing runs the forward once more; DPO (and GRPO with beta > 0) runs a no-grad reference
    forward over the same tokens inside the loss (+1 forward)."""
    a = req.arch
    passes = 6.0 if req.method == "full" else 4.0
    if req.method == "freeze":
        passes = 4.0 + 2.0 * min(req.freeze_layers, a.layers) / a.layers
    fwd = forward_flops_per_token(req)
    total = passes / 2 * fwd
    if req.gradient_checkpointing:
        total += fwd
    if req.reference_forward:
        total += fwd
    return total


def trained_tokens_per_example(req: PlanRequest, avg_tokens: float) -> float:
    """Tokens the train forward/backward sees per example (a sample, a pair, a prompt), with `avg_tokens` the mean
    length of one sequence (SFT sample; chosen or rejected answer with its prompt) or, for GRPO, of one prompt:
    pairs count twice (chosen + rejected); a GRPO prompt counts G rollouts of prompt + a full-length completion
    (the upper bound: completions that end early train fewer tokens)."""
    if req.grpo:
        return req.num_generations * (min(avg_tokens, req.rollout_prompt) + req.max_completion_length)
    per = min(avg_tokens, req.seq_len)
    return 2 * per if req.pairs else per


def generation_seconds_per_prompt(req: PlanRequest, tflops: float | None, prompt_tokens: float | None = None,
                                  hbm_gb_s: float | None = None) -> float:
    """GRPO: seconds to sample G completions of max_completion_length for one prompt (0 for other objectives).

    Counted per prompt as if it were decoded alone (dsft decodes a micro-batch of prompts together, which shares each
    decode step's weight traffic among them and runs each prompt's prefill once: an upper bound). Prefill: G × prompt
    tokens at the
    model FLOPs utilisation of training. Decode: max_completion_length steps, each the larger of its compute
    (G tokens × forward FLOPs at that MFU) and its memory traffic (the weights a step touches — every weight of a
    dense model, the routed experts G·k tokens can visit of an MoE — plus the KV cache read, at
    DECODE_BANDWIDTH_EFFICIENCY of the HBM bandwidth): a decode step with a small G is bandwidth-bound. Per-step
    launch and Python overhead of HF generate is not counted (it dominates for small models: measure them).
    Unknown bandwidth (a bare memory size, the CPU): compute only.
    """
    if not req.grpo or not tflops:
        return 0.0
    a = req.arch
    G, C = req.num_generations, req.max_completion_length
    P = min(prompt_tokens or req.rollout_prompt, req.rollout_prompt)
    rate = tflops * 1e12 * req.mfu
    fwd = forward_flops_per_token(req)
    prefill = G * P * fwd / rate
    compute = G * fwd / rate
    memory = 0.0
    if hbm_gb_s:
        experts = min(a.n_routed_experts, G * a.experts_per_token) if a.moe else 0
        touched = a.total_params() - a.n_moe_layers * (a.n_routed_experts - experts) * a.expert_params()
        kv = a.layers * G * (P + C / 2) * kv_bytes_per_token(req)  # the cache read, on average half grown
        per_param = base_weight_bytes(req) / a.total_params()  # as stored: 16-bit, NF4, FP8 blocks
        memory = (touched * per_param + kv) / (hbm_gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    return prefill + C * max(compute, memory)
