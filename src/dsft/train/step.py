"""One optimizer step of `dsft train`, public: forward/backward over micro-batches, unscale + clip, apply.

The summed token loss of a step's micro-batches is divided by the step's label count, so the gradient does not
depend on how the step is split (micro-batches, ranks, packed rows). The loop (`dsft.train.loop`) and the
planner's measurements (`dsft.train.measure`) both call these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

from dsft.train.batching import collate_packed, collate_padded, real_tokens, split_micro
from dsft.train.encode import Encoded

FaultHook = Callable[[int, int], None]
"""fault_hook(step, micro_batch_size) runs before every micro-batch (tests inject OOM with it)."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def collate(chunk: Sequence[Encoded], *, packing: bool, capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_packed(chunk, capacity, pad_id) if packing else collate_padded(chunk, pad_id)


def forward_backward(loss_mod, exs: list[Encoded], *, micro: int, n_labels: int, packing: bool, capacity: int,
                     pad_id: int, dist, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     scaler: torch.amp.GradScaler | None = None, fault_hook: FaultHook | None = None,
                     step: int = 0, collate_fn: Callable[..., dict[str, torch.Tensor]] = collate) -> tuple[float, int]:
    """Forward/backward this rank's micro-batches of one step; gradients = d(Σ token CE / n_labels) over all ranks.
    Returns (Σ token CE, real tokens) over all ranks.

    Micro-batches are dealt round-robin to ranks; DDP / ZeRO average gradients over ranks, hence the × world.
    A rank left without a micro-batch (short last step) still joins the gradient sync with a zero loss; under
    FSDP / DeepSpeed, whose every forward/backward is collective, short ranks pad with zero-loss passes so all
    ranks run the same number. collate_fn: how a chunk becomes a batch (objectives collate pairs / rollouts).
    """
    chunks = split_micro(exs, micro)
    mine = [(c, float(dist.world)) for c in chunks[dist.rank::dist.world]]
    passes = -(-len(chunks) // dist.world) if dist.lockstep else 1
    mine += [(chunks[0], 0.0)] * (passes - len(mine))
    total, toks = 0.0, 0
    for j, (chunk, weight) in enumerate(mine):
        if fault_hook is not None:
            fault_hook(step, micro)
        batch = collate_fn(chunk, packing=packing, capacity=capacity, pad_id=pad_id)
        with dist.no_sync(loss_mod, sync=j == len(mine) - 1):
            with autocast():
                loss_sum = loss_mod(to_device(batch, dist.device))
            scaled = loss_sum * (weight / max(1, n_labels))
            dist.backward(scaler.scale(scaled) if scaler is not None else scaled)
        if weight:
            total += float(loss_sum.detach())
            toks += real_tokens(batch)
    if dist.world > 1:
        total, toks = dist.sum(total, float(toks))
    return total, int(toks)


def unscale_and_clip(dist, opt, scaler: torch.amp.GradScaler | None, params: list, max_norm: float, *,
                     loss_finite: bool = True) -> float:
    """Gradient norm before clipping at max_norm (fp16: after unscaling). Under DeepSpeed the engine clips
    inside `engine.step`, so the step is applied here already (not with a non-finite loss; see `apply_update`)."""
    if dist.engine is not None:
        return dist.step() if loss_finite else math.nan
    if scaler is not None:
        scaler.unscale_(opt)
    return dist.clip(params, max_norm)


def apply_update(dist, opt, scaler: torch.amp.GradScaler | None) -> None:
    """Apply the step's gradients and zero them (fp16: GradScaler skips a step with inf/NaN and adapts the scale)."""
    if dist.engine is not None:
        return  # applied and zeroed by engine.step in unscale_and_clip
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def eval_loss(loss_mod, model, examples: list[Encoded], *, micro: int, capacity: int, pad_id: int, device,
              packing: bool) -> float:
    """Mean token loss on held-out examples (dropout off)."""
    model.eval()
    total, n = 0.0, 0
    for chunk in split_micro(examples, micro):
        batch = collate(chunk, packing=packing, capacity=capacity, pad_id=pad_id)
        total += float(loss_mod(to_device(batch, device)))
        n += sum(e.n_labels for e in chunk)
    model.train()
    return total / max(1, n)
