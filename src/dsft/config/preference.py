"""`dpo:` and `grpo:` sections — preference optimisation (DPO / ORPO / SimPO) and GRPO with verifiable rewards.

Which one runs is `train.objective` (sft, dpo, orpo, simpo, grpo); `train.method` (lora, full, …) stays the way
the weights are trained. See docs/preference.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dsft.config.base import Section

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")


class DpoConfig(Section):
    """Preference pairs: DPO (sigmoid loss against a reference), ORPO (odds ratio + SFT), SimPO (length-normalised,
    no reference)."""

    beta: float = Field(0.1, gt=0)
    """DPO: temperature of the implicit reward β·log(π/π_ref) (TRL's default 0.1). SimPO: the reward scale β
    (the paper uses 2–10). ORPO: unused (see orpo_lambda)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """DPO: conservative DPO / robust label noise ε (0 = plain DPO)."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO: the target reward margin γ (in units of the length-normalised reward)."""
    orpo_lambda: float = Field(0.1, gt=0)
    """ORPO: weight λ of the odds-ratio term next to the chosen answer's NLL (the paper's 0.1)."""
    max_prompt_length: int | None = Field(None, gt=0)
    """Keep at most this many prompt tokens (from the end); default: whatever data.max_seq_length leaves."""


class RewardSpec(Section):
    """One reward function and its weight; the reward of a completion is Σ weight × function(completion, record)."""

    name: str
    """Built-in (exact, numeric, boxed, choice, regex, json_schema, think_format, length) or a user entry point
    `module:function` (called as fn(completion: str, record: dict, **args) → float)."""
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the function, e.g. {pattern: '^答案'} for regex or {target: 200} for length."""


class GrpoConfig(Section):
    """GRPO: G sampled completions per prompt, group-normalised advantages, clipped ratio, optional KL to the base."""

    num_generations: int = Field(8, ge=2)
    """G: completions sampled per prompt; the effective batch counts prompts (G × prompts completions a step)."""
    max_completion_length: int = Field(1024, gt=0)
    """New tokens per completion. R1-style reasoning needs ≥ 1024; TRL's 256 truncates them (trl#5697) — the
    truncation guard below stops a run where that happens."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0)
    """KL coefficient to the reference (the base; adapters disabled). 0 (default, as in TRL ≥ 0.19, DAPO and
    Dr. GRPO) skips the reference forward."""
    epsilon: float = Field(0.2, gt=0)
    """Clip range of the importance ratio (lower); epsilon_high defaults to it."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO's clip-higher uses 0.28)."""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """Token-loss normalisation: dapo = Σ token losses / Σ completion tokens of the step (default: no length bias
    between answers, and the step's loss does not depend on how it is split into micro-batches, which keeps the OOM
    ladder and resume exact); grpo = mean per completion, then mean; dr_grpo = Σ / (completions × max length)."""
    scale_rewards: bool = True
    """Divide the group-centred rewards by the group's std (GRPO); False = Dr. GRPO's unscaled advantages."""
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric")])
    """Reward functions (default: numeric answer match against the record's `answer`, `\\boxed{}` aware)."""
    max_truncated_ratio: float = Field(0.5, gt=0, le=1)
    """Stop when at least this share of a step's completions hit max_completion_length without ending."""
    zero_advantage_steps: int = Field(5, gt=0)
    """Stop when every group's rewards are all equal (no learning signal) for this many steps in a row."""
    guard_warmup_steps: int = Field(0, ge=0)
    """Steps at the start during which the truncation guard only warns."""
    rollout_backend: Literal["transformers", "vllm", "auto"] = "transformers"
    """What samples the G completions: transformers (the training model itself), vllm (an in-process vLLM engine
    built from the base model folder, the policy's weights — LoRA merged on the fly — pushed into it before each
    step's rollouts; must be usable here, else an error) or auto (vLLM only when it is usable and on a CUDA GPU).
    Log-probs for the loss always come from the training model. See docs/preference.md."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """rollout_backend vllm on a GPU: the share of GPU memory vLLM takes (weights + KV cache), beside training."""
