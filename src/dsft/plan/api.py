"""What other stages and the CLI may call in the planner (no torch import unless a device is auto-detected).

  plan_training(cfg, model_dir) → (micro_batch, grad_accum, plan)   `dsft train`: prints, warns, resolves `auto`
  plan_for_config(cfg, model_dir) → Plan                            the plan of a config as `dsft train` runs it
  auto_micro_batch(cfg, model_dir) → (micro_batch, grad_accum)      per_device_train_batch_size: auto
  plan_from_options(options) → Plan                                 `dsft plan` flags (+ an optional CONFIG)
  estimate(PlanRequest(...)) → Estimate, fit_micro_batch(PlanRequest(...)) → int, plan_json(plan) → str
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsft.errors import ConfigError
from dsft.plan.estimate import Estimate, PlanRequest, estimate
from dsft.plan.from_config import (
    auto_micro_batch,
    dataset_tokens,
    effective_batch,
    plan_for_config,
    plan_training,
    request_from_config,
)
from dsft.plan.guidance import split_batch
from dsft.plan.hardware import GPUS, Gpu, cpu_device, parse_gpu
from dsft.plan.models import BUILTIN, Arch, arch_from_hf_config, resolve_arch
from dsft.plan.plan import Plan, fit_micro_batch, make_plan, plan_json
from dsft.plan.request import GRPO_DEFAULT_PROMPT

__all__ = [
    "Arch", "BUILTIN", "Estimate", "GPUS", "Gpu", "Plan", "PlanRequest", "arch_from_hf_config", "auto_micro_batch",
    "cpu_device", "effective_batch",
    "estimate", "fit_micro_batch", "make_plan", "parse_gpu", "plan_for_config", "plan_from_options", "plan_json",
    "plan_training", "request_from_config", "request_from_options", "resolve_arch", "split_batch",
]

# option name (the CLI's dest) → PlanRequest field
_FIELDS = (("method", "method"), ("seq_len", "seq_len"), ("batch", "micro_batch"), ("grad_accum", "grad_accum"),
           ("precision", "precision"), ("optimizer", "optimizer"), ("gc", "gradient_checkpointing"),
           ("packing", "packing"), ("gpus", "num_gpus"), ("lora_rank", "lora_rank"), ("lora_dropout", "lora_dropout"),
           ("lora_targets", "lora_targets"), ("freeze_layers", "freeze_layers"), ("attn", "attn"), ("mfu", "mfu"),
           ("trainer", "trainer"), ("label_fraction", "label_fraction"), ("interconnect", "interconnect"),
           ("objective", "objective"), ("num_generations", "num_generations"),
           ("max_completion_length", "max_completion_length"), ("prompt_length", "prompt_length"), ("beta", "beta"),
           ("esft_experts", "esft_experts"), ("esft_top_p", "esft_top_p"))


def _check_numbers(o: Mapping[str, Any]) -> None:
    for name in ("seq_len", "batch", "grad_accum", "gpus", "lora_rank", "freeze_layers", "examples",
                 "max_completion_length", "prompt_length", "esft_experts"):
        v = o.get(name)
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected a positive integer")
    for name in ("avg_tokens", "tflops", "label_fraction", "mfu"):
        v = o.get(name)
        if v is not None and (not isinstance(v, int | float) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected a positive number")
    g = o.get("num_generations")
    if g is not None and (not isinstance(g, int) or g < 2):
        raise ConfigError(f"--num-generations {g}: expected an integer ≥ 2 (completions per prompt)")
    b = o.get("beta")
    if b is not None and (not isinstance(b, int | float) or not b >= 0):
        raise ConfigError(f"--beta {b}: expected a number ≥ 0")
    if o.get("zero") is not None and o["zero"] not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {o['zero']}: expected a ZeRO stage 0, 1, 2 or 3")


def _from_config(o: Mapping[str, Any], gpu: Gpu | None) -> tuple[PlanRequest, dict[str, Any]]:
    from dsft.config import load_config
    from dsft.config.resolve import resolve_config
    from dsft.config.yaml_io import parse_overrides
    from dsft.model.info import read_model_info

    cfg = load_config(o["config"], parse_overrides(o.get("overrides") or []))
    if o.get("model"):
        cfg.model.name_or_path = o["model"]
    cfg = resolve_config(cfg, read_model_info(cfg.model.name_or_path))  # the same values `dsft train` will use
    req = request_from_config(cfg, gpu=gpu)
    if cfg.train.per_device_train_batch_size == "auto" and o.get("batch") is None:
        micro, accum = auto_micro_batch(cfg, gpu=gpu)
        req = replace(req, micro_batch=micro, grad_accum=accum)
    extra = {"tflops": o.get("tflops") or cfg.plan.tflops, "examples": o.get("examples"),
             "avg_tokens": o.get("avg_tokens")}
    if extra["examples"] is None:
        ds = dataset_tokens(cfg)
        if ds:
            extra["examples"], extra["avg_tokens"] = ds[0], extra["avg_tokens"] or ds[1]
    return req, extra


def request_from_options(options: Mapping[str, Any]) -> tuple[PlanRequest, dict[str, Any]]:
    """The PlanRequest `dsft plan` describes (flags over an optional CONFIG), and make_plan's keyword options."""
    o = dict(options)
    _check_numbers(o)
    target = o.get("config")
    if target and (Path(target).is_dir() or target.endswith(".json")):  # `dsft plan DIR`: a checkpoint, not a config
        if o.get("model"):
            raise ConfigError(f"dsft plan {target}: a model folder and --model {o['model']} were both given; give one")
        o["config"], o["model"] = None, target
    gpu = parse_gpu(o["gpu"]) if o.get("gpu") else None
    if o.get("config"):
        req, extra = _from_config(o, gpu)
    else:
        if not o.get("model"):
            raise ConfigError("dsft plan: give --model (a built-in name, a model folder or config.json) or a CONFIG file")
        req = PlanRequest(arch=resolve_arch(o["model"]), gpu=gpu or parse_gpu("A100-80GB"))
        extra = {"tflops": o.get("tflops"), "examples": o.get("examples"), "avg_tokens": o.get("avg_tokens")}
    changes = {}
    for opt, key in _FIELDS:
        v = o.get(opt)
        if v is not None:
            changes[key] = v.strip().lower() if isinstance(v, str) and key != "attn" else v
    if o.get("zero") is not None:
        changes["sharding"] = "none" if o["zero"] == 0 else f"zero{o['zero']}"
    if o.get("fsdp"):
        changes["sharding"] = "fsdp"
    if o.get("offload"):
        changes["cpu_offload"] = True
    if changes.get("precision") == "amp":
        changes["precision"] = "amp-bf16"
    req = replace(req, **changes)
    if req.grpo and not o.get("config") and o.get("seq_len") is None:
        # no CONFIG and no --seq-len: room for a 512-token prompt (or --prompt-length) next to the completion
        req = replace(req, seq_len=(req.prompt_length or GRPO_DEFAULT_PROMPT) + req.max_completion_length)
    req = req.validate()
    if extra["examples"] and not extra["avg_tokens"]:
        extra["avg_tokens"] = float(req.rollout_prompt if req.grpo else req.seq_len)
    return req, extra


def plan_from_options(options: Mapping[str, Any]) -> Plan:
    """`dsft plan`'s answer for its options (the CLI's argument names; see dsft.plan.cli)."""
    req, extra = request_from_options(options)
    return make_plan(req, **extra)
