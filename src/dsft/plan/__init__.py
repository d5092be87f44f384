"""Stage 'plan' of dsft: memory and hardware planner (per-GPU peak, verdict, batch size, smallest hardware).

Other stages call `dsft.plan.api` (plan_training, plan_for_config, auto_micro_batch …); the pipeline calls
`dsft.plan.stage.run`. The names below are re-exported from there.
"""

from dsft.plan.api import (
    BUILTIN,
    GPUS,
    Arch,
    Estimate,
    Gpu,
    Plan,
    PlanRequest,
    auto_micro_batch,
    estimate,
    fit_micro_batch,
    make_plan,
    parse_gpu,
    plan_for_config,
    plan_training,
    request_from_config,
    resolve_arch,
    split_batch,
)
from dsft.plan.stage import run

__all__ = [
    "Arch", "BUILTIN", "Estimate", "GPUS", "Gpu", "Plan", "PlanRequest", "auto_micro_batch", "estimate",
    "fit_micro_batch", "make_plan", "parse_gpu", "plan_for_config", "plan_training", "request_from_config", "resolve_arch",
    "run", "split_batch",
]
