"""CLI of `dsft plan`: size GPUs and memory for a fine-tuning setup before training."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  dsft plan --model deepseek-llm-7b --method lora --seq-len 512 --batch 16 --gpu A100-40GB
  dsft plan --model deepseek-v3 --method qlora --seq-len 4096 --gpu H200 --gpus 8 --zero 3
  dsft plan --model r1-distill-qwen-7b --method full --precision amp-bf16 --gpu 24GB --json
  dsft plan examples/demo.yaml                 # the setup of a dsft config (as `dsft train` runs it)
  dsft plan --model ./my-model/config.json --examples 20000 --avg-tokens 300 --mfu 0.4
"""


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="size GPUs and memory for a fine-tuning setup (per-GPU peak, verdict, batch, time)",
        description="Estimate the per-GPU peak memory of one training step (weights, adapter, gradients, optimizer "
                    "state, activations, logits/loss, overhead), say whether it fits, the largest micro-batch that "
                    "fits, the smallest 'N × GPU' that fits, recommended hyperparameters and time per epoch.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG", help="a dsft config file (flags below override it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with CONFIG), e.g. --set train.method=full")
    p.add_argument("--model", help="built-in name (deepseek-llm-7b, deepseek-v3, r1-distill-qwen-7b …), a model "
                                   "folder or a config.json path")
    p.add_argument("--method", help="lora | qlora | dora | full | freeze (default lora)")
    p.add_argument("--seq-len", type=int, help="sequence length in tokens (default 512)")
    p.add_argument("--batch", "--micro-batch", dest="batch", type=int, help="micro-batch per GPU (default 1)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    p.add_argument("--precision", help="bf16 | fp16 | fp32 | amp-bf16 | amp-fp16 (amp: fp32 master weights; default bf16)")
    p.add_argument("--optimizer", help="adamw | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd (default adamw)")
    p.add_argument("--gradient-checkpointing", dest="gc", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack samples into full sequences (default on); affects tokens per epoch")
    p.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3")
    p.add_argument("--fsdp", action="store_true", help="FSDP full sharding (like ZeRO-3)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state (and ZeRO-3 params) to CPU")
    p.add_argument("--gpu", help="A100-40GB, A100-80GB, H100, H200, L40S, 4090, 3090 or a memory size like 24GB "
                                 "(default A100-80GB; with CONFIG: plan.gpu or this machine)")
    p.add_argument("--gpus", type=int, help="number of GPUs (default 1)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: the seed matrix for the model size)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1)")
    p.add_argument("--lora-targets", help="all (default: every linear PEFT targets by name) | attention | a "
                                          "comma list such as q_proj,v_proj")
    p.add_argument("--freeze-layers", type=int, help="with --method freeze: how many last layers train (default 2)")
    p.add_argument("--attn", help="sdpa | flash_attention_2 | eager (default sdpa)")
    p.add_argument("--trainer", help="dsft (the step `dsft train` runs: logits only on labelled tokens, chunked) | "
                                     "hf (a Hugging Face Trainer step: logits for every token) (default dsft)")
    p.add_argument("--label-fraction", type=float, help="share of tokens with a loss target (default 1.0)")
    p.add_argument("--examples", type=int, help="training examples per epoch (for tokens and time per epoch)")
    p.add_argument("--avg-tokens", type=float, help="mean tokens per example (default: seq-len)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed for time (default 0.35)")
    p.add_argument("--tflops", type=float, help="peak TFLOPS per GPU (default: the GPU type's dense bf16 peak)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for tools)")
    p.set_defaults(func=_run)


def build_request(args: argparse.Namespace):
    """The PlanRequest (and Plan options) described by the command line."""
    from dataclasses import replace

    from dsft.cli_common import parse_overrides
    from dsft.config import load_config
    from dsft.errors import ConfigError
    from dsft.plan.estimate import PlanRequest
    from dsft.plan.hardware import parse_gpu
    from dsft.plan.models import resolve_arch
    from dsft.plan.plan import request_from_config

    def positive(name: str, value, kind=int):
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"--{name} {value}: expected a positive {'integer' if kind is int else 'number'}")
        return value

    for name in ("seq_len", "batch", "grad_accum", "gpus", "lora_rank", "freeze_layers", "examples"):
        positive(name.replace("_", "-"), getattr(args, name))
    for name in ("avg_tokens", "tflops", "label_fraction", "mfu"):
        positive(name.replace("_", "-"), getattr(args, name), float)
    if args.zero is not None and args.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {args.zero}: expected a ZeRO stage 0, 1, 2 or 3")

    gpu = parse_gpu(args.gpu) if args.gpu else None
    tflops = args.tflops
    if args.config:
        cfg = load_config(args.config, parse_overrides(args.overrides))
        if args.model:
            cfg.model.name_or_path = args.model
        req = request_from_config(cfg, gpu=gpu)
        if cfg.train.per_device_train_batch_size == "auto" and args.batch is None:
            from dsft.plan.plan import auto_micro_batch

            micro, accum = auto_micro_batch(cfg, gpu=gpu)
            req = replace(req, micro_batch=micro, grad_accum=accum)
        tflops = tflops or cfg.plan.tflops
        if args.examples is None:
            from dsft.plan.plan import dataset_tokens

            ds = dataset_tokens(cfg)
            if ds:
                args.examples, args.avg_tokens = ds[0], args.avg_tokens or ds[1]
    else:
        if not args.model:
            raise ConfigError("dsft plan: give --model (a built-in name, a model folder or config.json) or a CONFIG file")
        req = PlanRequest(arch=resolve_arch(args.model), gpu=gpu or parse_gpu("A100-80GB"))
    changes = {}
    for attr, key in (("method", "method"), ("seq_len", "seq_len"), ("batch", "micro_batch"), ("grad_accum", "grad_accum"),
                      ("precision", "precision"), ("optimizer", "optimizer"), ("gc", "gradient_checkpointing"),
                      ("packing", "packing"), ("gpus", "num_gpus"), ("lora_rank", "lora_rank"),
                      ("lora_dropout", "lora_dropout"), ("lora_targets", "lora_targets"), ("freeze_layers", "freeze_layers"),
                      ("attn", "attn"), ("mfu", "mfu"), ("trainer", "trainer"), ("label_fraction", "label_fraction")):
        v = getattr(args, attr)
        if v is not None:
            changes[key] = v.strip().lower() if isinstance(v, str) and key != "attn" else v
    if args.zero is not None:
        changes["sharding"] = "none" if args.zero == 0 else f"zero{args.zero}"
    if args.fsdp:
        changes["sharding"] = "fsdp"
    if args.offload:
        changes["cpu_offload"] = True
    if changes.get("precision") == "amp":
        changes["precision"] = "amp-bf16"
    req = replace(req, **changes).validate()
    return req, {"examples": args.examples, "avg_tokens": args.avg_tokens or (float(req.seq_len) if args.examples else None),
                 "tflops": tflops}


def _run(args) -> int:
    from dsft.plan.plan import make_plan, plan_json

    req, opts = build_request(args)
    plan = make_plan(req, **opts)
    print(plan_json(plan) if args.json else plan.table())
    return 0
