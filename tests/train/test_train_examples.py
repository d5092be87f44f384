"""The shipped training examples load and say what their names promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsft.config import load_config
from dsft.train.dist import accelerate_config

EX = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name,method,strategy", [
    ("train_deepseek_llm_7b_lora", "lora", "auto"),
    ("train_r1_distill_qwen_7b_qlora", "qlora", "auto"),
    ("train_deepseek_v2_lite_moe_lora", "lora", "auto"),
    ("train_full_zero3", "full", "deepspeed"),
    ("train_multinode_2x8", "lora", "ddp"),
])
def test_example_configs_load(name, method, strategy):
    cfg = load_config(EX / f"{name}.yaml")
    assert cfg.train.method == method and cfg.train.strategy == strategy
    acfg = accelerate_config(cfg.train, n_gpu=8, mixed_precision="bf16")
    if name == "train_full_zero3":
        assert acfg["deepspeed_config"]["zero_stage"] == 3 and acfg["num_processes"] == 8
    if name == "train_multinode_2x8":
        assert acfg["num_processes"] == 16 and acfg["num_machines"] == 2
