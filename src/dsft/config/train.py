"""`train:` and `lora:` sections — fine-tuning method, schedule, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class LoraConfig(Section):
    r: int | None = Field(None, gt=0)
    """Rank; default from the preset for the model size (seed matrix), 8 for tiny models."""
    alpha: float | None = Field(None, gt=0)
    """Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora); default 2·r."""
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = "auto"
    use_rslora: bool = False
    use_dora: bool = False


class TrainConfig(Section):
    method: Literal["lora", "dora", "qlora", "full", "freeze"] = "lora"
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    per_device_train_batch_size: int | Literal["auto"] = 8
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    """Default from the preset for the model size (seed matrix: 7B 3e-5, 13B 2e-5, 34B 1e-5)."""
    lr_scheduler: Literal["cosine_with_restarts", "cosine", "linear", "constant"] = "cosine_with_restarts"
    cycle_fraction: float = Field(0.2, gt=0, le=1)
    """One cosine cycle = this fraction of total steps (seed: 20 %)."""
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float | None = None
    """Default 0.95 for full fine-tuning, 0.999 for adapters."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    logging_dir: str | None = None
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    evaluation_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int = Field(100, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    early_stopping_delta: float = Field(0.0, ge=0)
    packing: bool = True
    gradient_checkpointing: bool = False
    freeze_trainable_layers: int = Field(2, gt=0)
    freeze_trainable_modules: list[str] = Field(default_factory=list)
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])
    seed: int = 42
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    nproc: int = Field(1, gt=0)
