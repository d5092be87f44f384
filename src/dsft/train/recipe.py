"""Setting up one training run: tokenizer and examples → base model + method → batch and schedule → state.

`build_recipe` returns the run's fixed facts (`Recipe`: examples, model folder, hyperparameters, steps, batch,
precision …) and the model; `build_state` wraps the model into the mutable `TrainState` (loss module, AdamW,
GradScaler, OOM ladder, early stopping). The order of the calls that draw random numbers (seed, LoRA init) is
the order the trainer has always used, so a run is bit-identical to earlier versions at the same thread count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.config import Config
from dsft.errors import TrainError
from dsft.run import RunDir, atomic_write_text
from dsft.train import setup
from dsft.train.batching import StepPlan
from dsft.train.dist import Dist
from dsft.train.encode import (
    Encoded,
    EncodeReport,
    check_template_parity,
    dataset_fingerprint,
    encode_records,
)
from dsft.train.hparams import Hyperparameters, hyperparameters
from dsft.train.objectives import for_config
from dsft.train.offload import offload_available
from dsft.train.state import EarlyStopping, Ladder, TrainState, run_info


@dataclass
class Recipe:
    """The fixed facts of one training run (nothing here changes while it trains)."""

    cfg: Config
    dist: Dist
    stage_dir: Path
    model_dir: Path
    tok: Any
    examples: list[Encoded]
    eval_examples: list[Encoded]
    enc_rep: EncodeReport
    fingerprint: str
    hp: Hyperparameters
    info: dict[str, Any]
    plan: StepPlan
    total_steps: int
    warmup: int
    micro: int
    effective: int
    capacity: int
    pad_id: int
    precision: str
    prev_attn: str | None
    objective: Any = None
    """dsft.train.objectives: DPO/ORPO/SimPO/GRPO plugged into this loop; None for SFT."""

    @property
    def tc(self):
        return self.cfg.train

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def autocast(self):
        return setup.autocast_for(self.precision, self.device)

    def run_info(self) -> dict[str, Any]:
        return run_info(self.tc, total_steps=self.total_steps, effective=self.effective,
                        fingerprint=self.fingerprint, world=self.dist.world)


def build_recipe(cfg: Config, run: RunDir, dist: Dist, records: list[dict], eval_records: list[dict],
                 train_path: Path) -> tuple[Recipe, Any]:
    """Tokenize, load the base, apply the method, size batch and schedule → (recipe, model to train)."""
    from dsft.model.load import resolve_model_dir

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model_dir = resolve_model_dir(cfg.model.name_or_path).resolve()
    tok = _tokenizer(cfg, model_dir)
    check_template_parity(tok, records, template=cfg.model.chat_template or cfg.model.tokenizer or str(model_dir),
                          force=cfg.model.force_template)
    max_len = cfg.data.max_seq_length
    objective = for_config(cfg)
    if objective is not None:
        encode = objective.encode
    else:  # SFT: the think block is trained unless data.think_in_loss is false
        encode = functools.partial(encode_records, think_in_loss=cfg.data.think_in_loss)
    examples, enc_rep = encode(tok, records, max_len, source=str(train_path))
    eval_examples = encode(tok, eval_records, max_len, source="eval.jsonl")[0] if eval_records else []

    model = setup.load_base(cfg, model_dir, dist.device)
    hp = hyperparameters(cfg, setup.count_params(model))
    esft = None
    if tc.method == "esft":  # profile the base on this run's data and pick the experts (dsft.train.esft_select)
        from dsft.train.esft_select import selection_for_run

        esft = selection_for_run(cfg, run.root, model, model_dir, examples, tok=tok, is_main=dist.is_main)
    model, info = setup.apply_method(model, cfg, hp, esft=esft)
    model.train()
    prev_attn = _packed_attention(model, tc, dist.device)
    micro, accum = plan_micro_batch(cfg, run, model_dir, hp, quiet=not dist.is_main)
    effective = micro * accum * dist.world
    plan = StepPlan(len(examples), effective, tc.seed, group_by_length=not tc.packing and tc.group_by_length,
                    lengths=tuple(len(e.input_ids) for e in examples))
    total_steps = tc.max_steps or max(1, math.ceil(hp.epochs * plan.steps_per_epoch))
    capacity = tc.pack_length or max_len
    if prev_attn is not None and not tc.pack_length:
        capacity = 1 << 30  # per-sample attention: one row per micro-batch, no padding at all
    precision = setup.resolve_precision(tc.precision, dist.device)
    if precision == "fp16":
        setup.fp32_master_weights(model)
    recipe = Recipe(cfg=cfg, dist=dist, stage_dir=run.root / "train", model_dir=model_dir, tok=tok,
                    examples=examples, eval_examples=eval_examples, enc_rep=enc_rep,
                    fingerprint=dataset_fingerprint(examples), hp=hp, info=info, plan=plan, total_steps=total_steps,
                    warmup=tc.warmup_steps or int(tc.warmup_ratio * total_steps), micro=micro, effective=effective,
                    capacity=capacity, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                    precision=precision, prev_attn=prev_attn, objective=objective)
    return recipe, model


def _tokenizer(cfg: Config, model_dir: Path):
    from dsft.model.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model.tokenizer or str(model_dir), trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    if tok.chat_template is None:
        raise TrainError(f"{model_dir}: the tokenizer has no chat template; set model.chat_template")
    return tok


MASK_READING_TYPES = ("deepseek_v32",)


def _packed_attention(model, tc, device: torch.device) -> str | None:
    """Per-sample attention for packed rows (train.packed_attention; CPU default); the previous implementation.
    DeepSeek-V3.2's sparse-attention indexer reads the (block-diagonal) mask itself, so it keeps transformers' masked
    path: per-sample segments would hand it no mask."""
    if tc.packing and model.config.model_type in MASK_READING_TYPES:
        if tc.packed_attention == "segments":
            raise TrainError(f"train.packed_attention segments: {model.config.model_type} (DeepSeek-V3.2's sparse-attention "
                             f"indexer) needs the attention mask; use auto or mask")
        return None
    if tc.packing and (tc.packed_attention == "segments" or (tc.packed_attention == "auto" and device.type == "cpu")):
        from dsft.train.attention import use_packed_attention

        return use_packed_attention(model)
    return None


def plan_micro_batch(cfg: Config, run: RunDir, model_dir: Path, hp: Hyperparameters, *, quiet: bool) -> tuple[int, int]:
    """Ask the memory planner before training: print its plan (or, when this run's plan stage already printed it, its
    verdict), warn if it will not fit, and resolve `per_device_train_batch_size: auto` to the largest micro-batch that
    fits, with gradient accumulation keeping the effective batch."""
    from dsft.plan.api import plan_training  # the plan stage's public API

    tc = cfg.train
    lines: list[str] = []
    planned_micro, planned_accum, plan = plan_training(cfg, model_dir, echo=lines.append)
    if plan is not None:
        atomic_write_text(run.root / "train" / "plan.txt", plan.table() + "\n")
    if not quiet:
        if run.has("plan") and plan is not None:
            print(f"dsft train: plan — {plan.verdict()} (train/plan.txt)")
            for line in lines:
                if line.startswith("warning"):
                    print(line)
        else:
            print("\n".join(lines))
    if tc.per_device_train_batch_size == "auto":
        if planned_micro:
            return planned_micro, planned_accum
        return hp.auto_micro_batch, tc.gradient_accumulation_steps
    return tc.per_device_train_batch_size, tc.gradient_accumulation_steps


def build_state(r: Recipe, model, eval_fn) -> TrainState:
    """Loss module (wrapped for DDP/FSDP, compiled on request), AdamW, GradScaler, OOM ladder, early stopping."""
    tc, dist = r.tc, r.dist
    can_offload = offload_available(r.device) and dist.world == 1
    ladder = Ladder(micro_batch=r.micro, gradient_checkpointing=tc.gradient_checkpointing, can_offload=can_offload)
    if tc.offload and dist.world == 1:
        if can_offload:
            ladder.offload = True
        elif dist.is_main:
            print("dsft train: train.offload: training runs on the CPU, whose memory the state already lives in — "
                  "nothing to offload", flush=True)
    if tc.gradient_checkpointing:
        setup.enable_checkpointing(model)
    raw_loss = r.objective.build_loss(model, r) if r.objective is not None else setup.build_loss(model, tc.loss_chunk_size, tc.mtp_loss_weight)
    loss_mod = dist.prepare(raw_loss)
    if tc.compile and dist.world == 1:
        loss_mod = torch.compile(loss_mod, dynamic=True)
    opt, names = setup.make_optimizer(model, r.cfg, r.hp)
    if dist.kind == "DEEPSPEED" and r.precision == "fp16":
        raise TrainError("train.strategy deepspeed with precision fp16: dsft keeps DeepSpeed's own loss scaling off "
                         "and torch's GradScaler cannot unscale a ZeRO optimizer; use precision bf16 (or fp32)")
    # early stopping follows eval_fn.metric / eval_fn.greater_is_better when the hook declares them
    early = EarlyStopping(metric=getattr(eval_fn, "metric", "eval_loss") if eval_fn else "eval_loss",
                          greater_is_better=bool(getattr(eval_fn, "greater_is_better", False)) if eval_fn else False,
                          patience=tc.early_stopping_patience, delta=tc.early_stopping_delta)
    return TrainState(model=model, loss_mod=loss_mod, opt=opt, names=names, ladder=ladder, early=early,
                      scaler=setup.make_scaler(r.precision, r.device), objective=r.objective)
