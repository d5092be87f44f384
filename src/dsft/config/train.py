"""`train:` and `lora:` sections — fine-tuning method, schedule, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class LoraConfig(Section):
    r: int | None = Field(None, gt=0)
    """Rank; unset: the size class's preset (dsft.config.presets: tiny/small 16, 7B 32, 13B 48, 34B+ 64).
    The seed layout also accepts lora_args.lora_r / lora_rank / rank."""
    alpha: float | None = Field(None, gt=0)
    """Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora); unset: 2·r."""
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = "auto"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Literal["auto"] | list[str] = "auto"
    """Modules trained fully next to the adapter. auto: embeddings, LM head and norms for random-init models under
    100 M parameters (the tiny preset), none otherwise; resolution writes the concrete list."""


class TrainConfig(Section):
    method: Literal["lora", "dora", "qlora", "full", "freeze", "esft"] = "lora"
    """esft: only the routed experts the task uses train (DeepSeek MoE; see the `esft:` section and docs/esft.md)."""
    objective: Literal["sft", "dpo", "orpo", "simpo", "grpo"] = "sft"
    """What is optimised: sft (next-token loss on assistant turns), dpo / orpo / simpo (preference pairs, `dpo:`
    section) or grpo (RL prompts with verifiable rewards, `grpo:` section). See docs/preference.md."""
    num_train_epochs: float | None = Field(None, gt=0)
    """Unset: the preset's (3 for the tiny random-init row, else 1). train.max_steps, when set, wins."""
    max_steps: int | None = Field(None, gt=0)
    per_device_train_batch_size: int | Literal["auto"] = 8
    """Unset: the preset's effective batch (tiny: 8 × accumulation; larger classes: `auto`, the planner splits the
    preset's batch — 7B 16, 13B 8, 34B+ 4 — into micro-batch × accumulation by memory)."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    """Unset: the preset's (tiny 2e-3, small 5e-4, seed matrix: 7B 3e-5, 13B 2e-5, 34B+ 1e-5)."""
    lr_scheduler: Literal["cosine_with_restarts", "cosine", "linear", "constant"] = "cosine_with_restarts"
    cycle_fraction: float = Field(0.2, gt=0, le=1)
    """One cosine cycle = this fraction of total steps (seed: 20 %)."""
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Used when warmup_steps is 0."""
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float | None = None
    """Unset: 0.95 for full/freeze fine-tuning (the seed's rule), 0.999 for adapters."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    logging_dir: str | None = None
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    evaluation_strategy: Literal["no", "steps", "epoch"] = "no"
    """Evaluate on the eval split every eval_steps steps or at every epoch's end; with data.eval_size 0,
    resolution carves a 5 % eval split (a 0 set explicitly is refused)."""
    eval_steps: int = Field(100, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without an improvement larger than early_stopping_delta (seed: 3)."""
    early_stopping_delta: float = Field(0.001, ge=0)
    """Minimum improvement of the metric that resets patience (the seed's min delta 0.001; HF's
    early_stopping_threshold)."""
    mtp_loss_weight: float = Field(0.0, ge=0, le=10)
    """λ of DeepSeek-V3's multi-token-prediction loss (the report used 0.3, then 0.1). 0: the MTP layer stays on disk
    (default). > 0 on an FP8 DeepSeek-V3/R1 base with an MTP layer: the MTP block is loaded (FP8 kept e4m3), gets
    LoRA like the main layers, and λ × its cross-entropy (predicting token i+2) is added to the loss."""
    packing: bool = True
    gradient_checkpointing: bool = False
    freeze_trainable_layers: int = Field(2, gt=0)
    freeze_trainable_modules: list[str] = Field(default_factory=list)
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])
    seed: int = 42
    loss_health_ratio: float = Field(0.3, gt=0, lt=1)
    loss_health_steps: int = Field(1000, gt=0)
    """Seed rule: warn when the training loss has not fallen below loss_health_ratio × its initial value
    within loss_health_steps steps."""
    grad_spike_factor: float = Field(10.0, gt=1)
    """Log a grad-norm spike when the norm exceeds this × the median of the last 50 steps."""
    oom_ladder: bool = True
    """On out-of-memory: halve micro-batch (double accumulation) → gradient checkpointing → offload."""
    pack_length: int | None = Field(None, gt=8)
    """Row capacity when packing; default data.max_seq_length."""
    group_by_length: bool = True
    """When packing is off: batch samples of similar length together (less padding)."""
    loss_chunk_size: int = Field(4096, gt=0)
    """Tokens per chunk of the LM head + cross-entropy (logits only where labels exist)."""
    packed_attention: Literal["auto", "segments", "mask"] = "auto"
    """How packed rows attend: `segments` runs SDPA per packed sample (Σ Lᵢ² work, CPU default); `mask` uses the
    model's attn_implementation with transformers' block-diagonal mask / flash-attention varlen (GPU default)."""
    compile: bool = False
    """torch.compile the model (inductor)."""
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    nproc: int = Field(1, gt=0)
    """Processes (GPUs) per machine; > 1 re-launches under `accelerate launch` (same as --nproc)."""
    num_machines: int = Field(1, gt=0)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int = 29500
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage when strategy is deepspeed."""
    offload: bool = False
    """CPU offload: optimizer (ZeRO-2/3), parameters (ZeRO-3, FSDP); one process on a GPU: AdamW state + activations."""
