"""Training objectives other than SFT, plugged into the same loop, state, checkpoints and OOM ladder.

An objective provides: `encode(tok, records, max_len, source=)` → (examples, EncodeReport); `build_loss(model,
recipe)` → the loss module (forward(batch) → Σ unit losses); `collate(chunk, packing=, capacity=, pad_id=)`;
`prepare_step(recipe, state, step, examples)` → (units to forward, normaliser) — GRPO samples its rollouts here;
`step_metrics(step)` (guards raise here); `evaluate(recipe, state)`; `state_dict()` / `load_state_dict()` (saved
in checkpoints); `manifest(history)`; `plot(history, stage_dir)`; `units_per_example` (units per planned example).
"""

from __future__ import annotations

from typing import Any


def for_config(cfg) -> Any | None:
    """The objective object of `train.objective`, or None for plain SFT."""
    kind = cfg.train.objective
    if kind == "sft":
        return None
    if kind == "grpo":
        from dsft.train.objectives.grpo import GrpoObjective

        return GrpoObjective(cfg)
    from dsft.train.objectives.dpo import PreferenceObjective

    return PreferenceObjective(cfg)
