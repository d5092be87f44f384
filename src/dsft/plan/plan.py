"""A full plan: estimate + verdict, largest micro-batch, smallest hardware, hyperparameters, time per epoch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from dsft.plan import checkpoint, guidance, scaling
from dsft.plan.activations import kv_bytes_per_token
from dsft.plan.estimate import Estimate, PlanRequest, estimate
from dsft.plan.hardware import GPUS, SEARCH_ORDER, GiB, Gpu
from dsft.plan.models import fmt_count
from dsft.plan.recommend import Recommendation, recommend
from dsft.plan.request import esft_selected
from dsft.plan.throughput import (
    generation_seconds_per_prompt,
    train_flops_per_token,
    trained_tokens_per_example,
)
from dsft.report.numbers import fmt_duration

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


def smallest_hardware(req: PlanRequest, gpu: Gpu) -> tuple[int, str, bool] | None:
    """Smallest N such that N × gpu fits this setup at micro-batch 1: (N, sharding, gradient checkpointing).

    More than one GPU only helps when something is sharded, so N > 1 uses ZeRO-3 unless the request already
    shards; gradient checkpointing is switched on only when it is what makes the setup fit.
    """
    gcs = [True] if req.gradient_checkpointing else [False, True]
    for n in GPU_COUNTS:
        sharding = req.sharding if (n == 1 or req.sharding in ("zero3", "fsdp")) else "zero3"
        for gc in gcs:
            trial = replace(req, gpu=gpu, num_gpus=n, sharding=sharding, micro_batch=1, gradient_checkpointing=gc,
                            interconnect=None)  # memory does not depend on the link (and another GPU may lack it)
            if fits(trial):
                return n, sharding, gc
    return None


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
    seed_row: dict[str, str] | None = None

    @property
    def fits(self) -> bool:
        return self.estimate.peak - self.estimate.pageable <= self.request.gpu.memory_bytes

    @property
    def tokens_per_step(self) -> int:
        """Token positions the train forward/backward sees per optimizer step (pairs: both sequences; GRPO: G
        rollouts per prompt)."""
        r = self.request
        return r.tokens * r.grad_accum * r.num_gpus

    @property
    def tokens_per_epoch(self) -> int | None:
        if not self.examples or not self.avg_tokens:
            return None
        r = self.request
        avg = self.avg_tokens
        if not r.packing and not r.grpo:
            avg = min(min(avg, r.seq_len) * PAD_FACTOR, r.seq_len)
        return int(self.examples * trained_tokens_per_example(r, avg))

    @cached_property
    def scaling(self) -> dict[str, Any] | None:
        """Multi-GPU traffic against compute and the scaling efficiency (None on one GPU or unknown FLOPS)."""
        return scaling.scaling(self.request, self.tflops)

    @property
    def efficiency(self) -> float:
        s = self.scaling
        return s["efficiency"] if s else 1.0

    @property
    def _tflops(self) -> float | None:
        return self.tflops or self.request.gpu.bf16_tflops

    def generation_seconds_per_prompt(self) -> float:
        """GRPO: seconds of sampling per prompt on one GPU (0 otherwise; see dsft.plan.throughput)."""
        r = self.request
        prompt = self.avg_tokens if self.examples else None
        return generation_seconds_per_prompt(r, self._tflops, prompt, r.gpu.hbm_gb_s)

    @property
    def seconds_per_epoch(self) -> float | None:
        tok = self.tokens_per_epoch
        tf = self._tflops
        if tok is None or not tf:
            return None
        r = self.request
        train = tok * train_flops_per_token(r) / (r.num_gpus * tf * 1e12 * r.mfu) / self.efficiency
        # GRPO: every rank samples the whole step's prompts (same seeds, same completions; not sharded yet)
        return train + self.examples * self.generation_seconds_per_prompt()

    @property
    def tokens_per_second(self) -> float | None:
        """Trained tokens per second over all GPUs at the stated MFU and the multi-GPU scaling efficiency (None
        when the device's FLOPS are unknown); GRPO counts the sampling time of each prompt's G rollouts."""
        tf = self._tflops
        if not tf:
            return None
        r = self.request
        rate = r.num_gpus * tf * 1e12 * r.mfu / train_flops_per_token(r) * self.efficiency
        gen = self.generation_seconds_per_prompt()
        if not gen:
            return rate
        per_prompt = trained_tokens_per_example(r, self.avg_tokens or r.rollout_prompt)
        return per_prompt / (per_prompt / rate + gen)  # generation is not sharded over the GPUs

    def to_dict(self) -> dict[str, Any]:
        r, e = self.request, self.estimate
        return {
            "model": {"name": r.arch.name, "family": r.arch.family, "total_params": r.arch.total_params(),
                      "active_params": r.arch.active_params(), "layers": r.arch.layers, "hidden": r.arch.hidden,
                      "vocab": r.arch.vocab},
            "checkpoint": checkpoint.to_dict(r.arch),
            "setup": {"method": r.method, "seq_len": r.seq_len, "micro_batch": r.micro_batch, "grad_accum": r.grad_accum,
                      "precision": r.precision, "optimizer": r.optimizer,
                      "gradient_checkpointing": r.gradient_checkpointing, "packing": r.packing,
                      "sharding": r.sharding, "cpu_offload": r.cpu_offload, "num_gpus": r.num_gpus,
                      "gpu": r.gpu.name, "gpu_memory_bytes": r.gpu.memory_bytes,
                      "interconnect": r.interconnect or scaling.default_interconnect(r.gpu),
                      "lora_rank": r.rank if r.adapter else None, "trainable_params": e.trainable_params,
                      **({"esft_experts": {str(i): esft_selected(r, i) for i in range(r.arch.layers)
                                           if esft_selected(r, i)}, "esft_token_share": r.esft_top_p}
                         if r.method == "esft" else {}),
                      "trainer": r.trainer, "label_fraction": r.label_fraction, "objective": r.objective},
            "objective": self.objective(),
            "memory_bytes": {**{k: int(v) for k, v in e.breakdown().items()}, "allocated": int(e.allocated),
                             "peak": int(e.peak), "pageable": int(e.pageable)},
            "peak_phase": e.phase,
            "fits": self.fits,
            "verdict": self.verdict(),
            "max_micro_batch": self.max_micro_batch,
            "smallest_hardware": self.smallest,
            "alternatives": self.alternatives,
            "seed_hardware": self.seed_row,
            "recommended": guidance.recommended(r, self.recommendation, self.max_micro_batch),
            "scaling": self.scaling,
            "throughput": self.throughput(),
            "notes": e.notes + self.notes,
        }

    def throughput(self) -> dict[str, Any]:
        r = self.request
        d = {"tokens_per_step": self.tokens_per_step, "tokens_per_epoch": self.tokens_per_epoch,
             "flops_per_token": train_flops_per_token(r), "mfu": r.mfu,
             "tflops_per_gpu": self.tflops or r.gpu.bf16_tflops, "scaling_efficiency": self.efficiency,
             "seconds_per_epoch": self.seconds_per_epoch, "tokens_per_second": self.tokens_per_second}
        if r.grpo:
            d["generation_seconds_per_prompt"] = self.generation_seconds_per_prompt() or None
            d["hbm_gb_s"] = r.gpu.hbm_gb_s
        return d

    def objective(self) -> dict[str, Any] | None:
        """What the training objective adds (None for SFT): sequences per micro-batch, the reference, rollouts."""
        r, e = self.request, self.estimate
        if r.objective == "sft":
            return None
        t = {k: int(v) for k, v in e.objective_terms.items()}
        ref = None
        if r.reference_forward:
            ref = "frozen copy of the model" if r.reference_copy else "base, adapters disabled"
        d: dict[str, Any] = {
            "name": r.objective, "sequences_per_micro_batch": r.sequences, "tokens_per_micro_batch": r.tokens,
            "reference": ref, **{f"{k}_bytes": v for k, v in t.items()}}
        if r.pairs:
            d["pairs"] = {"micro_batch": r.micro_batch, "sequences": r.sequences,
                          "note": "chosen + rejected of each pair packed into one forward (×2)"}
        if r.grpo:
            d["rollout"] = {"num_generations": r.num_generations, "prompt_tokens": r.rollout_prompt,
                            "max_completion_length": r.max_completion_length, "sequence_tokens": r.rollout_len,
                            "generation_batch": r.num_generations, "beta": r.beta,
                            "kv_cache_bytes_per_token_per_layer": kv_bytes_per_token(r),
                            "kv_cache": "compressed MLA latent (transformers 5)" if r.arch.mla else "K and V per KV head"}
        return d

    def _objective_lines(self) -> list[str]:
        r, e = self.request, self.estimate
        o = self.objective()
        if o is None:
            return []
        t = e.objective_terms
        line = f"objective: {r.objective}"
        if r.pairs:
            line += (f" — pairs ×2: {r.micro_batch} pair(s) per micro-batch = {r.sequences} sequences "
                     f"(chosen + rejected) of ≤ {r.seq_len} tokens in one forward")
        if r.grpo:
            line += (f" — {r.num_generations} completions per prompt: {r.micro_batch} prompt(s) per micro-batch = "
                     f"{r.sequences} rollouts of {r.rollout_prompt} prompt + {r.max_completion_length} completion "
                     f"tokens in the train forward")
        if o["reference"]:
            line += f"; reference: {o['reference']}"
        elif r.objective in ("orpo", "simpo"):
            line += "; no reference model"
        elif r.grpo:
            line += "; beta 0: no reference forward"
        lines = [line]
        if r.reference_forward:
            lines.append(f"  reference forward (no grad, inside the loss): {t['reference_forward'] / GiB:.2f} GiB "
                         f"transient, {t['reference_forward_allocated'] / GiB:.2f} GiB allocated then")
        if r.grpo:
            lines.append(f"  rollout generation ({r.micro_batch} prompt(s) × {r.num_generations} sequences, before the "
                         f"step): KV cache "
                         f"{t['rollout_kv_cache'] / GiB:.2f} GiB at {r.rollout_len} tokens, "
                         f"{t['rollout_allocated'] / GiB:.2f} GiB allocated at its peak; "
                         f"train forward/backward {t['train_allocated'] / GiB:.2f} GiB")
        return lines

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
        """The plan as text: what `dsft plan` prints and `plan/plan.txt` holds."""
        r, e = self.request, self.estimate
        lines = [f"dsft plan — {r.arch.summary()}"]
        if r.arch.fp8_block or r.arch.mtp_layers or r.arch.extra.get("checkpoint"):
            lines.append(f"checkpoint: {checkpoint.describe(r.arch)}")
        meth = r.method + (f" r={r.rank}" if r.adapter else "") + (f" (last {r.freeze_layers} layers)" if r.method == "freeze" else "")
        if r.method == "esft":
            n = [esft_selected(r, i) for i in range(r.arch.layers)]
            meth += (f" ({sum(n)} routed experts in {sum(1 for x in n if x)} MoE layers, "
                     f"{r.esft_top_p:.0%} of the token-slots)")
        lines.append(f"setup: {meth}, seq {r.seq_len} × micro-batch {r.micro_batch} × accum {r.grad_accum} × "
                     f"{r.num_gpus} GPU, {r.precision}, {r.optimizer}, "
                     f"{'gradient checkpointing' if r.gradient_checkpointing else 'no checkpointing'}, "
                     f"{'packing' if r.packing else 'padding'}, sharding {r.sharding}{', CPU offload' if r.cpu_offload else ''}, "
                     f"{'dsft train' if r.trainer == 'dsft' else 'HF Trainer'} step"
                     + (f", objective {r.objective}" if r.objective != "sft" else "")
                     + (f" (loss on {100 * r.label_fraction:.0f} % of tokens)" if r.trainer == "dsft" and r.label_fraction < 1 else ""))
        lines.append(f"trainable: {fmt_count(e.trainable_params)} of {fmt_count(e.total_params)} params")
        lines += self._objective_lines()
        lines += self._memory_lines()
        lines.append(f"verdict: {self.verdict()}")
        lines.append(f"largest micro-batch that fits at seq {r.seq_len}: {self.max_micro_batch or 'none (even 1 does not fit)'}")
        lines += self._hardware_lines()
        lines.append(guidance.recommended_line(r, guidance.recommended(r, self.recommendation, self.max_micro_batch)))
        if self.scaling:
            lines.append(scaling.describe(self.scaling))
        lines.append(self._throughput_line())
        lines += [f"note: {n}" for n in e.notes + self.notes]
        return "\n".join(lines)

    def _memory_lines(self) -> list[str]:
        r, e = self.request, self.estimate
        lines = [f"per-GPU peak memory (at {e.phase}):"]
        acts = "activations"
        if r.pairs:
            acts = "activations (pairs ×2)"
        elif r.grpo:
            acts = f"activations (×{r.num_generations} rollouts)"
        labels = {"weights": "weights", "adapter": "adapter", "gradients": "gradients", "optimizer": "optimizer state",
                  "activations": acts, "logits_loss": "logits / loss", "overhead": "framework overhead",
                  "reference_model": "reference model", "reference_forward": "reference forward",
                  "rollout_kv_cache": "rollout KV cache", "rollout_work": "rollout generation"}
        w = max(20, *(len(labels[k]) for k in e.breakdown()))
        for k, v in e.breakdown().items():
            lines.append(f"  {labels[k]:<{w}} {v / GiB:9.2f} GiB")
        lines.append(f"  {'total':<{w}} {e.peak / GiB:9.2f} GiB   (device: {r.gpu.name}, {r.gpu.memory_gib:.1f} GiB)")
        if e.pageable:
            lines.append(f"  {'pageable (paged opt.)':<{w}} {e.pageable / GiB:9.2f} GiB")
        return lines

    def _hardware_lines(self) -> list[str]:
        r, lines = self.request, []
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
        if self.seed_row:
            lines.append(f"  the guide's hardware table: {self.seed_row['line']}")
        return lines

    def _throughput_line(self) -> str:
        r = self.request
        t = self.throughput()
        tline = f"throughput: {t['tokens_per_step']} tokens per optimizer step"
        if t["tokens_per_epoch"]:
            tline += f"; {fmt_count(t['tokens_per_epoch'])} tokens per epoch"
        eff = f" and {100 * self.efficiency:.0f} % scaling" if self.scaling else ""
        if t["seconds_per_epoch"] is not None:
            tline += (f"; ≈ {fmt_duration(t['seconds_per_epoch'])} per epoch at {100 * r.mfu:.0f} % MFU of "
                      f"{t['tflops_per_gpu']:g} TFLOPS × {r.num_gpus}{eff}")
        elif t["tokens_per_epoch"]:
            tline += " (time: unknown FLOPS for this device; pass --tflops)"
        if t["tokens_per_second"]:
            tline += (f"; ≈ {fmt_count(t['tokens_per_second'])} tokens/s (≈ {fmt_duration(1e6 / t['tokens_per_second'])} per "
                      f"1 M tokens) at {100 * r.mfu:.0f} % MFU{eff}")
            if not t["tokens_per_epoch"]:
                tline += "; pass --examples/--avg-tokens (or run the data stage) for time per epoch"
        return tline


def _smallest(req: PlanRequest, gpu: Gpu) -> dict[str, Any] | None:
    """The smallest N × gpu that fits, as the plan reports it (with its micro-batch and multi-GPU scaling)."""
    s = smallest_hardware(req, gpu)
    if not s:
        return None
    there = replace(req, gpu=gpu, num_gpus=s[0], sharding=s[1], gradient_checkpointing=s[2],
                    interconnect=req.interconnect if gpu == req.gpu else None)
    mb = fit_micro_batch(there)
    sc = scaling.scaling(replace(there, micro_batch=max(mb, 1)), None)
    return {"gpus": s[0], "gpu": gpu.name, "sharding": s[1], "gradient_checkpointing": s[2],
            "hardware": f"{s[0]} × {gpu.name}", "micro_batch": mb,
            "scaling_efficiency": sc["efficiency"] if sc else None}


def make_plan(req: PlanRequest, *, examples: int | None = None, avg_tokens: float | None = None,
              tflops: float | None = None, search: bool = True) -> Plan:
    """Estimate a request and answer every question the planner answers."""
    req.validate()
    e = estimate(req)
    mmb = fit_micro_batch(req)
    rec = recommend(req.arch)
    smallest = None
    alternatives: dict[str, str] = {}
    seed = None
    if search:
        smallest = _smallest(req, req.gpu)
        on_seed_gpu = smallest if req.gpu.name == guidance.SEED_GPU else None
        wants_seed_row = guidance.SEED_GPU in rec.hardware
        for name in SEARCH_ORDER:
            if name == req.gpu.name:
                continue
            s2 = smallest_hardware(req, GPUS[name])
            alternatives[name] = (f"{s2[0]} × {name}" + (" (checkpointing)" if s2[2] and not req.gradient_checkpointing else "")
                                  if s2 else f"> {GPU_COUNTS[-1]} × {name}")
            if name == guidance.SEED_GPU and s2 and wants_seed_row:
                on_seed_gpu = _smallest(req, GPUS[name])
        if on_seed_gpu:
            est = on_seed_gpu["hardware"] + (f" ({on_seed_gpu['sharding']})" if on_seed_gpu["sharding"] != "none" else "") + (
                " with gradient checkpointing" if on_seed_gpu["gradient_checkpointing"] and not req.gradient_checkpointing else "")
            seed = guidance.seed_row(rec, est + f", micro-batch {on_seed_gpu['micro_batch']}")
        else:
            seed = guidance.seed_row(rec, None)
    problems = list((req.arch.extra.get("checkpoint") or {}).get("problems") or [])
    return Plan(req, e, mmb, smallest, alternatives, rec, examples, avg_tokens, tflops, notes=problems, seed_row=seed)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, ensure_ascii=False)
