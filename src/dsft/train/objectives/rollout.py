"""GRPO rollouts: G sampled completions per prompt from the current policy, cut at the end token, decoded.

Sampling draws from a generator seeded by (train.seed, step, prompt slot) inside a forked RNG, so the completions
of step k are a function of the weights at step k alone: a run resumed from a checkpoint samples exactly what the
uninterrupted run sampled, and the training RNG (dropout, data order) is never consumed by generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dsft.train.loss import unwrap


@dataclass
class Completion:
    """One sampled completion: token ids (incl. the end token when it ended), text, and whether it was cut."""

    ids: list[int]
    text: str
    truncated: bool


def sampler_seed(seed: int, step: int, slot: int) -> int:
    """The sampling seed of prompt slot `slot` at optimizer step `step` (0-based)."""
    return (seed * 1_000_003 + step * 10_007 + slot) % (2**62)


@contextlib.contextmanager
def generation_mode(model, prev_attn: str | None) -> Iterator[None]:
    """Eval mode with the model's own attention (not the packed-training kernel); restored afterwards."""
    inner = unwrap(model)
    packed = inner.config._attn_implementation if prev_attn is not None else None
    was_training = model.training
    if prev_attn is not None:
        inner.set_attn_implementation(prev_attn)
    model.eval()
    try:
        yield
    finally:
        if packed is not None:
            inner.set_attn_implementation(packed)
        model.train(was_training)


@torch.no_grad()
def sample_group(model, tok, prompt_ids: list[int], n: int, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, device: torch.device | str = "cpu",
                 greedy: bool = False, synced: bool = False) -> list[Completion]:
    """n completions of one prompt (transformers generate; greedy=True: one deterministic answer, n ignored).
    synced: sharded ranks (FSDP, ZeRO-3) keep stepping until every rank's generate has ended (`synced_gpus`), since
    every forward gathers parameters collectively."""
    inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, synced_gpus=synced,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if greedy:
        kw.update(do_sample=False, num_return_sequences=1)
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), **kw)
    result = []
    for row in out[:, inp.shape[1]:].tolist():
        if tok.eos_token_id in row:
            ids, cut = row[:row.index(tok.eos_token_id) + 1], False
        else:
            ids, cut = row, True
        text = tok.decode(ids, skip_special_tokens=True)
        result.append(Completion(ids=ids, text=text, truncated=cut))
    return result
