"""The training run's mutable state, saved to and restored from checkpoints by name.

`TrainState` holds what changes while training — model and loss module, optimizer (+ its parameter names),
GradScaler, the OOM ladder's rungs, early stopping, the monitor's history, the step (data position and schedule
follow from it) and the time spent — and turns into / comes back from a checkpoint's `state.json` keys and
safetensors files (`dsft.train.checkpoint`). RNG states travel in the checkpoint too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.errors import TrainError
from dsft.train import checkpoint as ck
from dsft.train.setup import enable_checkpointing

log = logging.getLogger("dsft.train")


@dataclass
class Ladder:
    """Seed 5.2: halve micro-batch (accumulation doubles, effective batch unchanged) → checkpointing → offload."""

    micro_batch: int
    gradient_checkpointing: bool = False
    offload: bool = False
    can_offload: bool = False  # one process on an accelerator (FSDP/DeepSpeed offload through train.offload instead)

    def next_rung(self, model) -> str | None:
        if self.micro_batch > 1:
            self.micro_batch //= 2
            return f"micro-batch halved to {self.micro_batch} (gradient accumulation doubled; effective batch unchanged)"
        if not self.gradient_checkpointing:
            self.gradient_checkpointing = True
            enable_checkpointing(model)
            return "gradient checkpointing enabled"
        if self.can_offload and not self.offload:
            self.offload = True
            return "offload enabled: AdamW state + fp32 master weights and saved activations in host memory"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "gradient_checkpointing": self.gradient_checkpointing,
                "offload": self.offload}

    def load_state_dict(self, st: dict[str, Any], model) -> None:
        """Keep the rungs a checkpoint reached (a smaller micro-batch, checkpointing, offload)."""
        if st.get("micro_batch") and st["micro_batch"] < self.micro_batch:
            self.micro_batch = st["micro_batch"]
        if st.get("gradient_checkpointing") and not self.gradient_checkpointing:
            self.gradient_checkpointing = True
            enable_checkpointing(model)
        if st.get("offload") and not self.offload:
            self.offload = True


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations of `metric` without an improvement larger than `delta`."""

    metric: str = "eval_loss"
    greater_is_better: bool = False
    patience: int | None = None
    delta: float = 0.0
    best: float = math.nan
    bad: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.best):
            self.best = -math.inf if self.greater_is_better else math.inf

    def update(self, value: float | None) -> bool:
        """Record one evaluation; True when patience has run out."""
        if value is None or not self.patience:
            return False
        better = value > self.best + self.delta if self.greater_is_better else value < self.best - self.delta
        if better:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        return self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_eval": self.best, "bad_evals": self.bad}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.best, self.bad = st.get("best_eval", self.best), st.get("bad_evals", 0)


@dataclass
class TrainState:
    """Everything a checkpoint holds; `step` is the number of optimizer steps done (the data position)."""

    model: Any
    loss_mod: Any
    opt: Any
    names: dict[int, str]
    ladder: Ladder
    early: EarlyStopping
    scaler: torch.amp.GradScaler | None = None
    monitor: Any = None
    step: int = 0
    train_seconds: float = 0.0
    """Seconds trained by earlier sessions of this run (a resumed run continues the count)."""
    history: list[dict] = field(default_factory=list)
    objective: Any = None
    """The training objective (dsft.train.objectives) when not SFT; its state_dict travels in state.json."""

    def state_dict(self, run_info: dict[str, Any], *, train_seconds: float) -> dict[str, Any]:
        """state.json of a checkpoint: the run's identity (`run_info`) + each component's named keys."""
        st = {"step": self.step, **run_info, **self.ladder.state_dict(), **self.early.state_dict(),
              "train_seconds": train_seconds,
              "history": self.monitor.history if self.monitor is not None else self.history,
              "data_position": {"next_step": self.step}}
        if self.scaler is not None:
            st["grad_scaler"] = self.scaler.state_dict()
        if self.objective is not None:
            st["objective"] = self.objective.state_dict()
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.step = st["step"]
        self.history = st.get("history", [])
        self.train_seconds = st.get("train_seconds", 0.0)
        self.early.load_state_dict(st)
        self.ladder.load_state_dict(st, self.model)
        if self.scaler is not None and st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        if self.objective is not None:
            self.objective.load_state_dict(st.get("objective") or {})


def run_info(tc, *, total_steps: int, effective: int, fingerprint: str, world: int) -> dict[str, Any]:
    """What a checkpoint records about the run it belongs to (checked again on resume)."""
    return {"total_steps": total_steps, "effective_batch": effective, "dataset": fingerprint, "method": tc.method,
            "world": world, "scheduler": {"kind": tc.lr_scheduler, "cycle_fraction": tc.cycle_fraction}}


def save(state: TrainState, info: dict[str, Any], dist, ckpt_root: Path, *, keep: int, train_seconds: float) -> None:
    """Write checkpoint-<step> (every rank calls this; the main rank writes)."""
    weights, optim = _gather(state, dist)
    st = state.state_dict(info, train_seconds=train_seconds)
    st["scheduler"] = {**st["scheduler"], "step": state.step}
    if dist.is_main:
        ck.save_checkpoint(ckpt_root, state.step, weights, optim, st, keep=keep)
    dist.barrier()


def _gather(state: TrainState, dist) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable weights, AdamW tensors) as full tensors, from one process or gathered from the ranks."""
    if dist.engine is not None:  # ZeRO: fp32 master weights and AdamW moments gathered from the partitions
        return dist.trainable_weights(state.model), dist.full_optimizer_tensors(state.opt, state.names)
    if dist.kind in ("FSDP", "DEEPSPEED"):  # sharded: gather weights; optimizer moments only for CPU FSDP2
        full = gathered_model_state(dist, state.loss_mod)
        trainable = {n for n, p in state.model.named_parameters() if p.requires_grad}
        weights = {n: t.detach().cpu().contiguous() for n, t in full.items() if n in trainable}
        return weights, (dist.full_optimizer_tensors(state.opt, state.names) if dist.cpu_fsdp else {})
    return ck.trainable_state(state.model), ck.optimizer_tensors(state.opt, state.names)


def gathered_model_state(dist, loss_mod) -> dict:
    """The model's full state dict under FSDP/DeepSpeed (every rank must call this), keys as the model names them."""
    full = dist.full_state(loss_mod)
    return {k.removeprefix("model."): v for k, v in full.items()}


def find_checkpoint(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint `--resume auto|DIR` names; None when `auto` finds no checkpoint at all (a fresh start).
    A missing or torn folder, or only torn checkpoints under `auto`, is a one-line TrainError."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise TrainError(f"checkpoint not found: {path}")
        if why := ck.verify(path):
            raise TrainError(f"{path}: cannot resume from this checkpoint: {why}")
        return path
    path = ck.latest_valid(ckpt_root)
    found = ck.list_checkpoints(ckpt_root)
    if path is None and found:
        raise TrainError(f"{ckpt_root}: every checkpoint is torn ({', '.join(p.name for _, p in found)}); nothing to "
                         f"resume from — pass --force to start over")
    return path


def restore(state: TrainState, path: Path, info: dict[str, Any], *, resume_force: bool) -> None:
    """Load checkpoint `path` into `state` after checking it belongs to this run (dataset, batch, method)."""
    try:
        saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrainError(f"{path / 'state.json'}: unreadable checkpoint state ({err})") from None
    changes = []
    if saved.get("dataset") != info["dataset"]:
        changes.append(f"dataset changed (fingerprint {saved.get('dataset')} → {info['dataset']})")
    if saved.get("effective_batch") != info["effective_batch"]:
        changes.append(f"effective batch changed ({saved.get('effective_batch')} → {info['effective_batch']})")
    if saved.get("method") != info["method"]:
        changes.append(f"method changed ({saved.get('method')} → {info['method']})")
    if changes and not resume_force:
        raise TrainError(f"{path}: refusing to resume: {'; '.join(changes)} — pass --resume-force to continue anyway")
    try:
        saved = ck.load_checkpoint(path, state.model, state.opt, state.names)
    except KeyError as err:
        raise TrainError(str(err).strip("'\"")) from err
    state.load_state_dict(saved)
    log.info("dsft train: resumed from %s (step %d of %d)", path, state.step, info["total_steps"])
