"""The seed guide's advice beside the estimate: hyperparameters by size class, full fine-tuning rules, its hardware row."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dsft.plan.estimate import estimate
from dsft.plan.hardware import GiB
from dsft.plan.recommend import Recommendation
from dsft.plan.request import PlanRequest

FULL_FT_MIN_ACCUM = 8  # the guide: gradient accumulation ≥ 8 for full fine-tuning
FULL_FT_BETAS = (0.9, 0.95)  # the guide: AdamW β = (0.9, 0.95) for full fine-tuning
SEED_GPU = "A100-40GB"  # the GPU of the guide's hardware table (7B → 1 ×, 13B → 2 ×, 34B → 4 ×)


def split_batch(effective: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro ≤ max_micro and micro × accum == effective (micro divides it)."""
    effective = max(1, effective)
    m = max(1, min(max_micro, effective))
    while effective % m:
        m -= 1
    return m, effective // m


def full_ft_batch(effective: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) for full fine-tuning: accumulation ≥ 8, micro-batch what fits and what is left."""
    micro, accum = split_batch(effective, max_micro)
    if accum >= FULL_FT_MIN_ACCUM:
        return micro, accum
    return max(1, min(max_micro, effective // FULL_FT_MIN_ACCUM)), FULL_FT_MIN_ACCUM


def master_weight_memory(req: PlanRequest) -> dict[str, int]:
    """Per-GPU peak of this full fine-tuning setup with fp32 master weights (mixed precision) and without (pure
    16-bit weights, gradients and AdamW moments)."""
    half = "fp16" if req.precision in ("fp16", "amp-fp16") else "bf16"
    with_masters = estimate(replace(req, precision=f"amp-{half}"))
    without = estimate(replace(req, precision=half))
    return {"with_fp32_masters": int(with_masters.peak), "without_fp32_masters": int(without.peak),
            "precision_with": f"amp-{half}", "precision_without": half}


def recommended(req: PlanRequest, rec: Recommendation, max_micro: int) -> dict[str, Any]:
    """The seed matrix's row for this model, split into micro-batch × accumulation that fits; for full fine-tuning
    the guide's rules instead of LoRA's: accumulation ≥ 8, mixed precision with fp32 masters, AdamW β2 0.95."""
    d: dict[str, Any] = rec.to_dict()
    if req.method != "full":
        micro, accum = split_batch(rec.effective_batch, max_micro or 1)
        return {**d, "micro_batch": micro, "grad_accum": accum, "lora_rank": rec.lora_rank if req.adapter else None}
    micro, accum = full_ft_batch(rec.effective_batch, max_micro or 1)
    return {**d, "lora_rank": None, "micro_batch": micro, "grad_accum": accum, "effective_batch": micro * accum,
            "seed_effective_batch": rec.effective_batch, "precision": "amp-fp16" if "fp16" in req.precision else "amp-bf16",
            "master_weights": "fp32", "adam_betas": list(FULL_FT_BETAS), "memory": master_weight_memory(req)}


def recommended_line(req: PlanRequest, r: dict[str, Any]) -> str:
    head = f"recommended ({r['size_class']} class, seed matrix): lr {r['learning_rate']:g}, "
    if req.method != "full":
        rank = f"LoRA rank {r['lora_rank']}, " if r["lora_rank"] else ""
        return (head + f"{rank}effective batch {r['effective_batch']} → micro-batch {r['micro_batch']} × accum "
                f"{r['grad_accum']}")
    m = r["memory"]
    more = (f" (the seed's batch {r['seed_effective_batch']} raised to keep accumulation ≥ {FULL_FT_MIN_ACCUM})"
            if r["effective_batch"] > r["seed_effective_batch"] else "")
    return (head + f"full fine-tuning as the guide says: effective batch {r['effective_batch']} → micro-batch "
            f"{r['micro_batch']} × accum {r['grad_accum']} (accumulation ≥ {FULL_FT_MIN_ACCUM}){more}; "
            f"{r['precision']} mixed precision with fp32 master weights{' and loss scaling' if 'fp16' in r['precision'] else ''}; "
            f"AdamW β=({FULL_FT_BETAS[0]}, {FULL_FT_BETAS[1]}); no LoRA rank\n"
            f"  memory per GPU at this setup: {m['with_fp32_masters'] / GiB:.1f} GiB with fp32 master weights "
            f"({m['precision_with']}: 4-byte weights and gradients + 8-byte AdamW moments), "
            f"{m['without_fp32_masters'] / GiB:.1f} GiB without ({m['precision_without']} weights, gradients and moments: "
            f"updates below 16-bit resolution are lost)")


def seed_row(rec: Recommendation, estimated: str | None) -> dict[str, str] | None:
    """The guide's hardware row beside the planner's answer on the same GPU (7B / 13B / 34B classes only)."""
    if SEED_GPU not in rec.hardware:
        return None
    est = estimated or f"none up to 256 × {SEED_GPU}"
    return {"seed": rec.hardware, "estimate": est, "line": f"seed: {rec.hardware}; estimate: {est}"}
