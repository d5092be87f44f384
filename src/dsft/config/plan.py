"""`plan:` section — hardware sizing (what `dsft plan` and `per_device_train_batch_size: auto` assume)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class PlanConfig(Section):
    gpu: str | None = None
    """GPU type (A100-40GB, A100-80GB, H100, H200, L40S, 4090, 3090) or a memory size like 24GB; None: this machine."""
    num_gpus: int = Field(1, gt=0)
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd"] = "adamw"
    sharding: Literal["auto", "none", "zero1", "zero2", "zero3", "fsdp"] = "auto"
    """auto: from train.strategy (fsdp → fsdp, deepspeed → zero2, else none)."""
    cpu_offload: bool = False
    mfu: float = Field(0.35, gt=0, le=1)
    """Model FLOPs utilisation assumed for the time-per-epoch estimate."""
    tflops: float | None = Field(None, gt=0)
    """Peak TFLOPS per GPU for the time estimate; default: the GPU type's dense bf16 peak."""
    effective_batch_size: int | None = Field(None, gt=0)
    """Per-device effective batch kept by `per_device_train_batch_size: auto` (default: the seed matrix's)."""
    label_fraction: float = Field(1.0, gt=0, le=1)
    """Share of tokens with a loss target (assistant tokens): dsft computes logits only there; 1.0 is the safe bound."""
    interconnect: str | None = None
    """Link between the GPUs for the multi-GPU time: nvlink, pcie, network or a rate like 50GB/s; None: by GPU type."""
