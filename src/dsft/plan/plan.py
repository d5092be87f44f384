"""A full plan: estimate + verdict, largest micro-batch, smallest hardware, hyperparameters, time per epoch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsft.plan.estimate import Estimate, PlanRequest, estimate
from dsft.plan.hardware import GPUS, SEARCH_ORDER, GiB, Gpu, cpu_device, parse_gpu
from dsft.plan.recommend import Recommendation, recommend
from dsft.report.numbers import fmt_count, fmt_duration

MAX_MICRO_BATCH = 4096
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PAD_FACTOR = 1.3  # padded / real tokens without packing (measured 1.21–1.42 on the medical QA data)


def fits(req: PlanRequest) -> bool:
    e = estimate(req)
    return e.peak - e.pageable <= req.gpu.memory_bytes


def fit_micro_batch(req: PlanRequest, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch (≤ limit) whose peak fits the device; 0 when even 1 does not."""
    if not fits(replace(req, micro_batch=1)):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(replace(req, micro_batch=hi)):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        if fits(replace(req, micro_batch=mid)):
            lo = mid
        else:
            hi = mid
    return lo


def split_batch(effective: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro ≤ max_micro and micro × accum == effective (micro divides it)."""
    effective = max(1, effective)
    m = max(1, min(max_micro, effective))
    while effective % m:
        m -= 1
    return m, effective // m


def smallest_hardware(req: PlanRequest, gpu: Gpu) -> tuple[int, str, bool] | None:
    """Smallest N such that N × gpu fits this setup at micro-batch 1: (N, sharding, gradient checkpointing).

    More than one GPU only helps when something is sharded, so N > 1 uses ZeRO-3 unless the request already
    shards; gradient checkpointing is switched on only when it is what makes the setup fit.
    """
    gcs = [True] if req.gradient_checkpointing else [False, True]
    for n in GPU_COUNTS:
        sharding = req.sharding if (n == 1 or req.sharding in ("zero3", "fsdp")) else "zero3"
        for gc in gcs:
            trial = replace(req, gpu=gpu, num_gpus=n, sharding=sharding, micro_batch=1, gradient_checkpointing=gc)
            if fits(trial):
                return n, sharding, gc
    return None


def train_flops_per_token(req: PlanRequest) -> float:
    """Model FLOPs per trained token: 2N forward, 2N input-gradients, 2N weight-gradients (full only), + attention."""
    a = req.arch
    n = a.active_params()
    qk = (a.qk_nope_head_dim + a.qk_rope_head_dim) if a.mla else a.hd
    v = a.v_head_dim if a.mla else a.hd
    attn_fwd = a.layers * req.seq_len * a.heads * (qk + v)  # causal: half of 2·S·heads·(qk+v)
    passes = 6.0 if req.method == "full" else 4.0
    if req.method == "freeze":
        passes = 4.0 + 2.0 * min(req.freeze_layers, a.layers) / a.layers
    fwd = 2.0 * n + 2 * attn_fwd
    total = passes / 2 * fwd
    if req.gradient_checkpointing:
        total += fwd
    return total


@dataclass
class Plan:
    """The planner's answer for one request."""

    request: PlanRequest
    estimate: Estimate
    max_micro_batch: int
    smallest: dict[str, Any] | None
    alternatives: dict[str, str]
    recommendation: Recommendation
    examples: int | None = None
    avg_tokens: float | None = None
    tflops: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.peak - self.estimate.pageable <= self.request.gpu.memory_bytes

    @property
    def tokens_per_step(self) -> int:
        r = self.request
        return r.micro_batch * r.seq_len * r.grad_accum * r.num_gpus

    @property
    def tokens_per_epoch(self) -> int | None:
        if not self.examples or not self.avg_tokens:
            return None
        r = self.request
        per = min(self.avg_tokens, r.seq_len)
        if not r.packing:
            per = min(per * PAD_FACTOR, r.seq_len)
        return int(self.examples * per)

    @property
    def seconds_per_epoch(self) -> float | None:
        tok = self.tokens_per_epoch
        tf = self.tflops or self.request.gpu.bf16_tflops
        if tok is None or not tf:
            return None
        r = self.request
        return tok * train_flops_per_token(r) / (r.num_gpus * tf * 1e12 * r.mfu)

    @property
    def tokens_per_second(self) -> float | None:
        """Trained tokens per second over all GPUs at the stated MFU (None when the device's FLOPS are unknown)."""
        tf = self.tflops or self.request.gpu.bf16_tflops
        if not tf:
            return None
        r = self.request
        return r.num_gpus * tf * 1e12 * r.mfu / train_flops_per_token(r)

    def to_dict(self) -> dict[str, Any]:
        r, e = self.request, self.estimate
        rec = self.recommendation
        micro, accum = split_batch(rec.effective_batch, self.max_micro_batch or 1)
        return {
            "model": {"name": r.arch.name, "family": r.arch.family, "total_params": r.arch.total_params(),
                      "active_params": r.arch.active_params(), "layers": r.arch.layers, "hidden": r.arch.hidden,
                      "vocab": r.arch.vocab},
            "setup": {"method": r.method, "seq_len": r.seq_len, "micro_batch": r.micro_batch, "grad_accum": r.grad_accum,
                      "precision": r.precision, "optimizer": r.optimizer,
                      "gradient_checkpointing": r.gradient_checkpointing, "packing": r.packing,
                      "sharding": r.sharding, "cpu_offload": r.cpu_offload, "num_gpus": r.num_gpus,
                      "gpu": r.gpu.name, "gpu_memory_bytes": r.gpu.memory_bytes,
                      "lora_rank": r.rank if r.adapter else None, "trainable_params": e.trainable_params,
                      "trainer": r.trainer, "label_fraction": r.label_fraction},
            "memory_bytes": {**{k: int(v) for k, v in e.breakdown().items()}, "allocated": int(e.allocated),
                             "peak": int(e.peak), "pageable": int(e.pageable)},
            "peak_phase": e.phase,
            "fits": self.fits,
            "verdict": self.verdict(),
            "max_micro_batch": self.max_micro_batch,
            "smallest_hardware": self.smallest,
            "alternatives": self.alternatives,
            "recommended": {**rec.to_dict(), "micro_batch": micro, "grad_accum": accum},
            "throughput": {"tokens_per_step": self.tokens_per_step, "tokens_per_epoch": self.tokens_per_epoch,
                           "flops_per_token": train_flops_per_token(r), "mfu": r.mfu,
                           "tflops_per_gpu": self.tflops or r.gpu.bf16_tflops,
                           "seconds_per_epoch": self.seconds_per_epoch, "tokens_per_second": self.tokens_per_second},
            "notes": e.notes + self.notes,
        }

    def verdict(self) -> str:
        r, e = self.request, self.estimate
        used = e.peak - e.pageable
        pct = 100 * used / r.gpu.memory_bytes
        where = f"{r.num_gpus} × {r.gpu.name}"
        if self.fits:
            return f"FITS on {where}: {used / GiB:.1f} of {r.gpu.memory_gib:.1f} GiB per GPU ({pct:.0f} %)"
        hint = ""
        gc_mb = 0 if r.gradient_checkpointing else fit_micro_batch(replace(r, gradient_checkpointing=True))
        gc_hint = f"; with gradient checkpointing micro-batch {gc_mb} fits" if gc_mb >= r.micro_batch else ""
        if self.max_micro_batch:
            hint = f"; micro-batch {self.max_micro_batch} fits (keep the effective batch with gradient accumulation){gc_hint}"
        elif gc_mb:
            hint = f"; with gradient checkpointing micro-batch {gc_mb} fits"
        elif self.smallest:
            hint = f"; smallest that fits: {self.smallest['hardware']}"
        return f"DOES NOT FIT on {where}: needs {used / GiB:.1f} GiB per GPU, has {r.gpu.memory_gib:.1f}{hint}"

    def table(self) -> str:
        r, e = self.request, self.estimate
        d = self.to_dict()
        lines = [f"dsft plan — {r.arch.summary()}"]
        meth = r.method + (f" r={r.rank}" if r.adapter else "") + (f" (last {r.freeze_layers} layers)" if r.method == "freeze" else "")
        lines.append(f"setup: {meth}, seq {r.seq_len} × micro-batch {r.micro_batch} × accum {r.grad_accum} × "
                     f"{r.num_gpus} GPU, {r.precision}, {r.optimizer}, "
                     f"{'gradient checkpointing' if r.gradient_checkpointing else 'no checkpointing'}, "
                     f"{'packing' if r.packing else 'padding'}, sharding {r.sharding}{', CPU offload' if r.cpu_offload else ''}, "
                     f"{'dsft train' if r.trainer == 'dsft' else 'HF Trainer'} step"
                     + (f" (loss on {100 * r.label_fraction:.0f} % of tokens)" if r.trainer == "dsft" and r.label_fraction < 1 else ""))
        lines.append(f"trainable: {fmt_count(e.trainable_params)} of {fmt_count(e.total_params)} params")
        lines.append(f"per-GPU peak memory (at {e.phase}):")
        labels = {"weights": "weights", "adapter": "adapter", "gradients": "gradients", "optimizer": "optimizer state",
                  "activations": "activations", "logits_loss": "logits / loss", "overhead": "framework overhead"}
        for k, v in e.breakdown().items():
            lines.append(f"  {labels[k]:<20} {v / GiB:9.2f} GiB")
        lines.append(f"  {'total':<20} {e.peak / GiB:9.2f} GiB   (device: {r.gpu.name}, {r.gpu.memory_gib:.1f} GiB)")
        if e.pageable:
            lines.append(f"  {'pageable (paged opt.)':<20} {e.pageable / GiB:9.2f} GiB")
        lines.append(f"verdict: {self.verdict()}")
        lines.append(f"largest micro-batch that fits at seq {r.seq_len}: {self.max_micro_batch or 'none (even 1 does not fit)'}")
        if self.smallest:
            needs = ([self.smallest["sharding"]] if self.smallest["sharding"] != "none" else []) + (
                ["gradient checkpointing"] if self.smallest["gradient_checkpointing"] and not r.gradient_checkpointing else [])
            lines.append(f"smallest hardware: {self.smallest['hardware']}"
                         + (f" with {' + '.join(needs)}" if needs else "")
                         + f" (largest micro-batch there: {self.smallest['micro_batch']})")
        else:
            lines.append(f"smallest hardware: none of up to {GPU_COUNTS[-1]} × {r.gpu.name} fits")
        if self.alternatives:
            lines.append("  other GPUs: " + ", ".join(f"{v}" for v in self.alternatives.values()))
        rec = d["recommended"]
        lines.append(f"recommended ({rec['size_class']} class, seed matrix): lr {rec['learning_rate']:g}, "
                     f"LoRA rank {rec['lora_rank']}, effective batch {rec['effective_batch']} → micro-batch "
                     f"{rec['micro_batch']} × accum {rec['grad_accum']}")
        t = d["throughput"]
        tline = f"throughput: {t['tokens_per_step']} tokens per optimizer step"
        if t["tokens_per_epoch"]:
            tline += f"; {fmt_count(t['tokens_per_epoch'])} tokens per epoch"
        if t["seconds_per_epoch"] is not None:
            tline += (f"; ≈ {fmt_duration(t['seconds_per_epoch'])} per epoch at {100 * r.mfu:.0f} % MFU of "
                      f"{t['tflops_per_gpu']:g} TFLOPS × {r.num_gpus}")
        elif t["tokens_per_epoch"]:
            tline += " (time: unknown FLOPS for this device; pass --tflops)"
        if t["tokens_per_second"]:
            tline += (f"; ≈ {fmt_count(t['tokens_per_second'])} tokens/s (≈ {fmt_duration(1e6 / t['tokens_per_second'])} per "
                      f"1 M tokens) at {100 * r.mfu:.0f} % MFU")
            if not t["tokens_per_epoch"]:
                tline += "; pass --examples/--avg-tokens (or run the data stage) for time per epoch"
        lines.append(tline)
        for n in d["notes"]:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def make_plan(req: PlanRequest, *, examples: int | None = None, avg_tokens: float | None = None,
              tflops: float | None = None, search: bool = True) -> Plan:
    """Estimate a request and answer every question the planner answers."""
    req.validate()
    e = estimate(req)
    mmb = fit_micro_batch(req)
    smallest = None
    alternatives: dict[str, str] = {}
    if search:
        s = smallest_hardware(req, req.gpu)
        if s:
            there = replace(req, num_gpus=s[0], sharding=s[1], gradient_checkpointing=s[2])
            mb = fit_micro_batch(there)
            smallest = {"gpus": s[0], "gpu": req.gpu.name, "sharding": s[1], "gradient_checkpointing": s[2],
                        "hardware": f"{s[0]} × {req.gpu.name}", "micro_batch": mb}
        for name in SEARCH_ORDER:
            if name == req.gpu.name:
                continue
            s2 = smallest_hardware(req, GPUS[name])
            alternatives[name] = (f"{s2[0]} × {name}" + (" (checkpointing)" if s2[2] and not req.gradient_checkpointing else "")
                                  if s2 else f"> {GPU_COUNTS[-1]} × {name}")
    return Plan(req, e, mmb, smallest, alternatives, recommend(req.arch), examples, avg_tokens, tflops)


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
    return PlanRequest(
        arch=arch, method=method, seq_len=cfg.data.max_seq_length, micro_batch=mb,
        grad_accum=t.gradient_accumulation_steps, precision=prec, optimizer=plan_cfg.optimizer,
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing, sharding=sharding,
        cpu_offload=plan_cfg.cpu_offload, num_gpus=max(plan_cfg.num_gpus, t.nproc) if dev.cuda else 1, gpu=dev,
        lora_rank=cfg.lora.r, lora_dropout=cfg.lora.dropout,
        lora_targets="all" if targets == "auto" else list(targets), freeze_layers=t.freeze_trainable_layers,
        attn=_attn_for(cfg, dev), mfu=plan_cfg.mfu, trainer="dsft", label_fraction=plan_cfg.label_fraction,
        modules_to_save=None if mts_cfg == "auto" else bool(mts_cfg),
    )


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


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, ensure_ascii=False)


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
