"""A dsft config as the planner sees it: config → PlanRequest, `auto` micro-batch, the plan `dsft train` prints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dsft.plan.estimate import PlanRequest
from dsft.plan.guidance import split_batch
from dsft.plan.hardware import GPUS, GiB, Gpu, cpu_device, parse_gpu
from dsft.plan.plan import Plan, fit_micro_batch, make_plan
from dsft.plan.recommend import recommend


# ---- dsft config → request ------------------------------------------------------------------------------------
def detect_device() -> Gpu:
    """The first CUDA device if there is one (name + memory), else the host (CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            for g in GPUS.values():
                if abs(g.memory_bytes - p.total_memory) / g.memory_bytes < 0.03 and g.name.split("-")[0].lower() in p.name.lower().replace(" ", ""):
                    return g
            return Gpu(p.name, int(p.total_memory), None)
    except Exception:  # pragma: no cover - torch missing or CUDA broken
        pass
    return cpu_device()


def _attn_for(cfg, dev: Gpu) -> str:
    """dsft train's attention path: per-sample SDPA for packed rows on CPU (train.packed_attention auto/segments)."""
    t = cfg.train
    mode = getattr(t, "packed_attention", "mask")
    if t.packing and (mode == "segments" or (mode == "auto" and not dev.cuda)):
        return "dsft_packed"
    return cfg.model.attn_implementation


def request_from_config(cfg, model_dir: str | Path | None = None, *, gpu: Gpu | None = None,
                        micro_batch: int | None = None) -> PlanRequest:
    """Map a dsft Config (train / lora / data / plan sections) to a PlanRequest."""
    from dsft.plan.models import resolve_arch

    arch = resolve_arch(str(model_dir or cfg.model.name_or_path))
    plan_cfg = cfg.plan
    dev = gpu or (parse_gpu(plan_cfg.gpu) if plan_cfg.gpu else detect_device())
    t = cfg.train
    prec = t.precision
    if prec == "auto":
        prec = "bf16" if dev.cuda else "fp32"
    if prec in ("bf16", "fp16") and cfg.model.dtype == "float32":
        prec = "amp-" + prec
    if prec == "fp16" and t.method in ("full", "freeze"):
        prec = "amp-fp16"  # fp16 training needs fp32 master weights (GradScaler)
    method = "dora" if (t.method == "lora" and cfg.lora.use_dora) else t.method
    mb = micro_batch or (t.per_device_train_batch_size if isinstance(t.per_device_train_batch_size, int) else 1)
    sharding = plan_cfg.sharding
    if sharding == "auto":
        sharding = "fsdp" if t.strategy == "fsdp" else ("zero2" if t.strategy == "deepspeed" else "none")
    targets = cfg.lora.target_modules
    mts_cfg = getattr(cfg.lora, "modules_to_save", "auto")
    g = cfg.grpo
    return PlanRequest(
        arch=arch, method=method, seq_len=cfg.data.max_seq_length, micro_batch=mb,
        grad_accum=t.gradient_accumulation_steps, precision=prec, optimizer=plan_cfg.optimizer,
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing, sharding=sharding,
        cpu_offload=plan_cfg.cpu_offload, num_gpus=max(plan_cfg.num_gpus, t.nproc) if dev.cuda else 1, gpu=dev,
        lora_rank=cfg.lora.r, lora_dropout=cfg.lora.dropout,
        lora_targets="all" if targets == "auto" else list(targets), freeze_layers=t.freeze_trainable_layers,
        attn=_attn_for(cfg, dev), mfu=plan_cfg.mfu, trainer="dsft", label_fraction=plan_cfg.label_fraction,
        modules_to_save=None if mts_cfg == "auto" else bool(mts_cfg), interconnect=plan_cfg.interconnect,
        objective=t.objective, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        beta=g.beta, **(_esft_request(cfg) if t.method == "esft" else {}),
    )


def _esft_request(cfg) -> dict:
    """method esft: experts per layer and their token share — from esft.experts, else from this run's profile
    (`<run_dir>/esft/expert_scores.json`: its selection and the selected experts' token-selection ratios), else
    esft.top_p alone (ceil(top_p × experts) per MoE layer)."""
    import json

    e = cfg.esft
    if e.experts:
        return {"esft_experts": {int(k): len(v) for k, v in e.experts.items()}, "esft_top_p": e.top_p}
    prof = Path(cfg.run_dir) / "esft" / "expert_scores.json"
    try:
        scores = json.loads(prof.read_text(encoding="utf-8"))
        chosen = {int(k): v for k, v in scores["selection"]["experts"].items()}
        share = [sum(scores["layers"][str(li)]["token"][x] for x in ids) for li, ids in chosen.items() if ids]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {"esft_top_p": e.top_p}
    return {"esft_experts": {li: len(ids) for li, ids in chosen.items()},
            "esft_top_p": sum(share) / len(share) if share else e.top_p}


def effective_batch(cfg, model_dir: str | Path | None = None) -> int:
    """Per-device effective batch to keep: micro × accum when set, else plan.effective_batch_size or the seed's."""
    t = cfg.train
    if isinstance(t.per_device_train_batch_size, int):
        return t.per_device_train_batch_size * t.gradient_accumulation_steps
    if cfg.plan.effective_batch_size:
        return cfg.plan.effective_batch_size
    from dsft.plan.models import resolve_arch

    return recommend(resolve_arch(str(model_dir or cfg.model.name_or_path))).effective_batch * t.gradient_accumulation_steps


def auto_micro_batch(cfg, model_dir: str | Path | None = None, *, gpu: Gpu | None = None) -> tuple[int, int]:
    """(micro_batch, grad_accum) for `per_device_train_batch_size: auto`: the largest micro-batch the planner
    says fits on this device, dividing the effective batch, which gradient accumulation keeps unchanged."""
    req = request_from_config(cfg, model_dir, gpu=gpu, micro_batch=1)
    eff = effective_batch(cfg, model_dir)
    return split_batch(eff, max(1, fit_micro_batch(req, limit=eff)))


def plan_for_config(cfg, model_dir: str | Path | None = None, *, gpu: Gpu | None = None, search: bool = True) -> Plan:
    """The plan of a dsft config as `dsft train` will run it (`auto` batch resolved first)."""
    mb = None
    if cfg.train.per_device_train_batch_size == "auto":
        mb, accum = auto_micro_batch(cfg, model_dir, gpu=gpu)
        req = replace(request_from_config(cfg, model_dir, gpu=gpu, micro_batch=mb), grad_accum=accum)
    else:
        req = request_from_config(cfg, model_dir, gpu=gpu)
    ds = dataset_tokens(cfg, model_dir)
    return make_plan(req, search=search, tflops=cfg.plan.tflops, examples=ds[0] if ds else None,
                     avg_tokens=ds[1] if ds else None)


def plan_training(cfg, model_dir: str | Path | None = None, *, echo=print,
                  gpu: Gpu | None = None) -> tuple[int | None, int, Plan | None]:
    """ONE call for `dsft train`: resolve `per_device_train_batch_size: auto`, print the plan, warn if it won't fit.

    Returns (micro_batch, grad_accum, plan). With an integer batch size these are the configured values; with
    `auto` they are the largest micro-batch that fits and the accumulation that keeps the effective batch.
    Never raises: a setup that does not fit gets a warning through `echo` (training may still be attempted);
    a model the planner cannot read gets a warning and (configured micro-batch or None, configured accumulation,
    None) — None meaning "use your own default".
    """
    from dsft.errors import DsftError

    t = cfg.train
    try:
        plan = plan_for_config(cfg, model_dir, gpu=gpu, search=False)
    except (DsftError, ValueError, KeyError, OSError) as err:
        if echo:
            echo(f"warning: the memory planner cannot plan this run ({err}); continuing without it")
        micro = t.per_device_train_batch_size if isinstance(t.per_device_train_batch_size, int) else None
        return micro, t.gradient_accumulation_steps, None
    r = plan.request
    if echo:
        echo(plan.table())
        if not plan.fits:
            echo(f"warning: the planner estimates {plan.estimate.peak / GiB:.1f} GiB per device but {r.gpu.name} has "
                 f"{r.gpu.memory_gib:.1f} GiB; expect out-of-memory (lower the micro-batch or sequence length, or turn "
                 f"on gradient checkpointing)")
    return r.micro_batch, r.grad_accum, plan


def dataset_tokens(cfg, model_dir: str | Path | None = None, *, sample: int = 256) -> tuple[int, float] | None:
    """(training examples, mean tokens per example) from the run's data stage, if it has run: the examples are
    counted from its manifest and a sample is rendered with the chat template and tokenized."""
    import random

    from dsft.run import RunDir, read_jsonl

    run = RunDir(cfg.run_dir)
    if not run.has("data"):
        return None
    man = run.read_manifest("data")
    train_path = Path(man.get("train", "train.jsonl"))
    if not train_path.is_absolute():
        train_path = run.stage_dir("data", create=False) / train_path
    if not train_path.exists():
        return None
    rows = read_jsonl(train_path)
    if not rows:
        return None
    pick = random.Random(0).sample(rows, min(sample, len(rows)))
    try:
        from dsft.model.load import resolve_model_dir
        from dsft.model.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.model.tokenizer or str(resolve_model_dir(str(model_dir or cfg.model.name_or_path))),
                             chat_template=cfg.model.chat_template)
        lengths = []
        for r in pick:
            ids = tok.apply_chat_template(r["messages"], tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            lengths.append(len(ids))
    except Exception:  # no local tokenizer (e.g. a built-in architecture name): ~1 token per 1.5 characters
        lengths = [sum(len(m.get("content", "")) for m in r.get("messages", [])) / 1.5 for r in pick]
    return len(rows), sum(lengths) / len(lengths)
