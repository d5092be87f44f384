"""Stage 'plan' of dsft: memory and hardware planner (per-GPU peak, verdict, batch size, smallest hardware).

API for other stages (no torch import unless a device is auto-detected):
  plan_training(cfg, model_dir) → (micro_batch, grad_accum, plan): prints the plan, warns, resolves `auto`
  plan_for_config(cfg, model_dir).table()      the plan `dsft train` prints before it starts
  auto_micro_batch(cfg, model_dir)             → (micro_batch, grad_accum) for per_device_train_batch_size: auto
  estimate(PlanRequest(...))                   → Estimate (per-GPU peak broken down)
  fit_micro_batch(PlanRequest(...))            → largest micro-batch that fits
"""

from dsft.plan.estimate import Estimate, PlanRequest, estimate
from dsft.plan.hardware import GPUS, Gpu, parse_gpu
from dsft.plan.models import BUILTIN, Arch, resolve_arch
from dsft.plan.plan import (
    Plan,
    auto_micro_batch,
    fit_micro_batch,
    make_plan,
    plan_for_config,
    plan_training,
    request_from_config,
    split_batch,
)

__all__ = [
    "Arch", "BUILTIN", "Estimate", "GPUS", "Gpu", "Plan", "PlanRequest", "auto_micro_batch", "estimate",
    "fit_micro_batch", "make_plan", "parse_gpu", "plan_for_config", "plan_training", "request_from_config", "resolve_arch",
    "split_batch",
]
