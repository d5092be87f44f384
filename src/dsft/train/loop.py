"""The training loop: one optimizer step after another, with the OOM ladder, evaluation, early stopping, checkpoints.

Each optimizer step takes a fixed, seed-determined list of samples (`StepPlan`), splits it into micro-batches
(packed by default) and divides the summed token loss by the step's label count (`dsft.train.step`), so the
gradient does not depend on how the step is split. That is what makes the OOM ladder (smaller micro-batches, same
effective batch) and packing exact, and resume bit-exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsft.errors import TrainError
from dsft.train import state as st
from dsft.train.objectives.rollout import generation_mode
from dsft.train.offload import activation_offload
from dsft.train.progress import progress_bar
from dsft.train.recipe import Recipe
from dsft.train.schedule import lr_factor
from dsft.train.step import FaultHook, apply_update, eval_loss, forward_backward, unscale_and_clip

log = logging.getLogger("dsft.train")

EvalFn = Callable[[Any, int], dict]
"""eval_fn(model, step) → {"eval_loss": float, ...}; drives early stopping on `eval_fn.metric` (default eval_loss)."""


@dataclass
class LoopResult:
    steps_done: int
    tokens_seen: int
    seconds: float
    cpu_seconds: float
    stopped_early: bool


def train_loop(r: Recipe, s: st.TrainState, *, eval_fn: EvalFn | None, fault_hook: FaultHook | None,
               progress: bool | None) -> LoopResult:
    """Steps s.step … total_steps; checkpoints every save_steps. On any error the trackers end as FAILED/KILLED."""
    tc, start = r.tc, s.step
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    bar = progress_bar(total=r.total_steps, initial=start, enabled=progress if r.dist.is_main else False)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    tokens_seen, stopped_early = 0, False
    try:
        for step in range(start, r.total_steps):
            rec = one_step(r, s, step, trainable, fault_hook)
            tokens_seen += rec["tokens"]
            s.step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if _evaluation_due(r, s.step, eval_fn):
                stopped_early = evaluate(r, s, eval_fn)
            if s.step % tc.save_steps == 0 or stopped_early:
                save_checkpoint(r, s, train_seconds=s.train_seconds + time.perf_counter() - t_start)
            if stopped_early:
                break
    except BaseException as err:  # NaN stop, OOM, Ctrl-C: end MLflow/W&B runs as failed, keep loss.png
        with contextlib.suppress(Exception):
            s.monitor.plot(r.stage_dir / "loss.png")
        s.monitor.close(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", png=r.stage_dir / "loss.png")
        raise
    finally:
        bar.close()
    return LoopResult(steps_done=s.step if r.total_steps > start else start, tokens_seen=tokens_seen,
                      seconds=time.perf_counter() - t_start, cpu_seconds=time.process_time() - cpu_start,
                      stopped_early=stopped_early)


def one_step(r: Recipe, s: st.TrainState, step: int, trainable: list, fault_hook: FaultHook | None) -> dict:
    """Optimizer step `step` (0-based): set the LR, forward/backward (retried down the OOM ladder), clip, check, apply."""
    tc, obj = r.tc, r.objective
    exs = [r.examples[i] for i in r.plan.samples(step)]
    if obj is not None:  # GRPO samples and scores its rollouts here; n_lab is the objective's normaliser
        exs, n_lab = obj.prepare_step(r, s, step, exs)
    else:
        n_lab = sum(e.n_labels for e in exs)
    cur_lr = r.hp.learning_rate * lr_factor(step, r.total_steps, r.warmup, tc.lr_scheduler, tc.cycle_fraction)
    for g in s.opt.param_groups:
        g["lr"] = cur_lr
    mtp = _mtp_module(s)
    if mtp is not None:
        mtp.pop_mtp()
    loss_sum, toks = _forward_backward_with_ladder(r, s, step, exs, n_lab, fault_hook)
    extra: dict = {}
    if mtp is not None:  # `loss` stays the LM loss; the differentiated objective is loss + λ · mtp_loss · (MTP/LM labels)
        lm_sum, mtp_sum, mtp_n = mtp.pop_mtp()
        if r.dist.world > 1:
            lm_sum, mtp_sum, mtp_n = r.dist.sum(lm_sum, mtp_sum, float(mtp_n))
        loss_sum = lm_sum
        extra = {"mtp_loss": mtp_sum / max(1, int(mtp_n)), "mtp_labels": int(mtp_n)}
    loss = loss_sum / max(1, n_lab)
    gn = unscale_and_clip(r.dist, s.opt, s.scaler, trainable, tc.max_grad_norm, loss_finite=math.isfinite(loss))
    rec = {"step": step + 1, "loss": loss, "lr": cur_lr, "grad_norm": gn, "tokens": toks,
           "epoch": round((step + 1) / r.plan.steps_per_epoch, 4), "micro_batch": s.ladder.micro_batch, **extra}
    if obj is not None:
        if r.dist.world > 1:  # each rank recorded its own pairs' / rollouts' statistics: the step's are all ranks'
            obj.loss.stats = {k: v for part in r.dist.gather_objects(obj.loss.stats) for k, v in part.items()}
        rec["objective"] = obj.step_metrics(step + 1)
    s.monitor.step(rec)  # raises on NaN/inf before the optimizer applies it
    apply_update(r.dist, s.opt, s.scaler)
    return rec


def _mtp_module(s: st.TrainState):
    """The CausalLMLoss under DDP / torch.compile wrappers when it adds an MTP loss, else None."""
    m = s.loss_mod
    for attr in ("_orig_mod", "module", "_orig_mod"):
        m = getattr(m, attr, m)
    return m if getattr(m, "mtp_weight", 0.0) > 0 else None


def _forward_backward_with_ladder(r: Recipe, s: st.TrainState, step: int, exs: list, n_lab: int,
                                  fault_hook: FaultHook | None) -> tuple[float, int]:
    """forward_backward; on out-of-memory climb one rung of the ladder and retry the step from its start (same
    samples, same dropout RNG), or stop with a hint when no rung is left."""
    rng = torch.get_rng_state()
    obj = r.objective
    kw = {"collate_fn": obj.collate} if obj is not None else {}
    while True:
        micro = s.ladder.micro_batch * (obj.units_per_example if obj is not None else 1)
        try:
            return forward_backward(s.loss_mod, exs, micro=micro, n_labels=n_lab, packing=r.tc.packing,
                                    capacity=r.capacity, pad_id=r.pad_id, dist=r.dist, autocast=_fwd_context(r, s),
                                    scaler=s.scaler, fault_hook=fault_hook, step=step + 1, **kw)
        except torch.OutOfMemoryError:
            s.opt.zero_grad(set_to_none=True)
            if _mtp_module(s) is not None:
                _mtp_module(s).pop_mtp()  # the retried step counts its MTP loss afresh
            if r.device.type == "cuda":
                torch.cuda.empty_cache()
            rung = _next_rung(r, s, step)
            s.monitor.event(step + 1, "oom", action=rung)
            with_offload(s, step + 1)
            torch.set_rng_state(rng)  # the retried step sees the same dropout masks


def _next_rung(r: Recipe, s: st.TrainState, step: int) -> str:
    dist = r.dist
    if dist.world > 1:  # one rank shrinking its micro-batch alone would break the ranks' lockstep
        raise TrainError(f"out of memory at step {step + 1} on rank {dist.rank} of {dist.world}: the OOM "
                         f"ladder works in one process; lower train.per_device_train_batch_size "
                         f"(gradient accumulation keeps the effective batch), turn on "
                         f"train.gradient_checkpointing, or use strategy deepspeed / fsdp with "
                         f"offload: true") from None
    rung = s.ladder.next_rung(s.model) if r.tc.oom_ladder else None
    if rung is None:
        tried = "gradient checkpointing on" + (" and offload on" if s.ladder.offload else "")
        raise TrainError(f"out of memory at step {step + 1} with micro-batch {s.ladder.micro_batch} and "
                         f"{tried}: use method qlora, a smaller data.max_seq_length, or "
                         f"--nproc N with strategy deepspeed (zero_stage 3, offload: true)") from None
    return rung


def _fwd_context(r: Recipe, s: st.TrainState):
    """autocast plus, once offload is on, activations saved for backward kept in host memory."""
    autocast = r.autocast

    @contextlib.contextmanager
    def ctx():
        with autocast(), activation_offload(s.ladder.offload, r.device):
            yield
    return ctx


def with_offload(s: st.TrainState, step: int) -> None:
    """Swap in the host-offloaded AdamW once the ladder (or train.offload) turned offload on."""
    from dsft.train.offload import HostOffloadAdamW

    if not s.ladder.offload or isinstance(s.opt, HostOffloadAdamW):
        return
    s.opt = HostOffloadAdamW(s.opt)
    mib = s.opt.moved_bytes() / 2**20
    log.info("dsft train: offload: %.1f MiB of optimizer state and master weights in host memory", mib)
    s.monitor.event(step, "offload", host_mib=round(mib, 2))


def _evaluation_due(r: Recipe, done: int, eval_fn: EvalFn | None) -> bool:
    tc = r.tc
    if tc.evaluation_strategy == "epoch" and (eval_fn is not None or r.eval_examples):
        return done % r.plan.steps_per_epoch == 0 or done == r.total_steps
    if eval_fn is not None or (tc.evaluation_strategy == "steps" and r.eval_examples):
        return done % tc.eval_steps == 0 or done == r.total_steps
    return False


def evaluate(r: Recipe, s: st.TrainState, eval_fn: EvalFn | None) -> bool:
    """Evaluate after step s.step, log it, update early stopping; True when patience has run out."""
    done = s.step
    if eval_fn is not None:  # it generates: the model's own attention (KV cache, padding mask), not the packed kernel
        with generation_mode(s.model, r.prev_attn):
            metrics = eval_fn(s.model, done)
    elif r.objective is not None:
        metrics = r.objective.evaluate(r, s)
    else:
        metrics = {"eval_loss": eval_loss(s.loss_mod, s.model, r.eval_examples, micro=s.ladder.micro_batch,
                                          capacity=r.capacity, pad_id=r.pad_id, device=r.device,
                                          packing=r.tc.packing)}
    s.model.train()
    s.monitor.eval_record(done, metrics)
    value = metrics.get(s.early.metric)
    if not s.early.update(value):
        return False
    s.monitor.event(done, "early_stop", metric=s.early.metric, value=value, best=s.early.best,
                    patience=s.early.patience)
    return True


def save_checkpoint(r: Recipe, s: st.TrainState, *, train_seconds: float) -> None:
    """checkpoint-<step> with the time trained so far (all sessions), and a fresh loss.png."""
    st.save(s, r.run_info(), r.dist, r.stage_dir / "checkpoints", keep=r.tc.save_total_limit,
            train_seconds=train_seconds)
    s.monitor.plot(r.stage_dir / "loss.png")
