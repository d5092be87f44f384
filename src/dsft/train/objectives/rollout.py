"""GRPO rollouts: G sampled completions per prompt from the current policy, cut at the end token, decoded.

Sampling draws from a generator seeded by (train.seed, step, prompt slot), never from the global RNG, so the
completions of step k are a function of the weights at step k alone: a run resumed from a checkpoint samples exactly
what the uninterrupted run sampled, and the training RNG (dropout, data order) is never consumed by generation.
`sample_groups` decodes several prompts in one batch (GRPO passes a micro-batch of prompts) and runs each prompt
through the model once (its KV cache is shared by its G completions); it draws the same tokens as `sample_group`
(transformers `generate`, one call per prompt), which stays for greedy answers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    return [to_completion(tok, row) for row in out[:, inp.shape[1]:].tolist()]


def to_completion(tok, row: list[int]) -> Completion:
    """A generated row cut after its first end token (kept), or marked truncated when it has none."""
    if tok.eos_token_id in row:
        ids, cut = row[:row.index(tok.eos_token_id) + 1], False
    else:
        ids, cut = row, True
    return Completion(ids=ids, text=tok.decode(ids, skip_special_tokens=True), truncated=cut)


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: transformers ≥ 5.2x renames `past_key_values` to `cache` model by model."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def warp_scores(scores: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """fp32 next-token scores after temperature and nucleus (top-p) filtering, as transformers' sampling warpers
    (temperature first; top-p removes the low tail whose cumulative probability is ≤ 1 − top_p, keeping ≥ 1 token)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1:] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


@torch.no_grad()
def sample_groups(model, tok, prompts: list[list[int]], n: int, *, max_new_tokens: int, seeds: list[int],
                  temperature: float = 1.0, top_p: float = 1.0, device: torch.device | str = "cpu",
                  all_ended: Callable[[bool], bool] | None = None) -> list[list[Completion]]:
    """n sampled completions of each prompt, all prompts decoded together.

    The prompts are left-padded into one batch and run through the model once each (not n times); the KV cache is
    then repeated n times per prompt and the n × len(prompts) rows decode together until every row has ended or
    max_new_tokens. Prompt i's rows draw with `torch.multinomial` from a generator seeded with seeds[i] exactly
    as `sample_group(..., seed=seeds[i])` does inside `generate` (same shapes, same order), so both return the same
    tokens up to float rounding of the logits (batched vs unbatched matmuls).
    all_ended: sharded ranks (FSDP, ZeRO-3) pass a collective "has every rank's batch ended?" so they stop at the same
    step (each forward gathers parameters together); rows that ended keep decoding pads, cut off after their end token.
    """
    dev = torch.device(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask, nxt = mask.repeat_interleave(n, dim=0), pos[:, -1:].repeat_interleave(n, dim=0) + 1
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    done = torch.zeros(len(prompts) * n, dtype=torch.bool, device=dev)
    rows: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        probs = F.softmax(warp_scores(logits, temperature=temperature, top_p=top_p), dim=-1)
        tokens = torch.full_like(done, pad, dtype=torch.long)
        live = (~done).view(len(prompts), n).any(dim=1).tolist()
        for i in (i for i, alive in enumerate(live) if alive):
            tokens[i * n:(i + 1) * n] = torch.multinomial(probs[i * n:(i + 1) * n], 1, generator=gens[i]).squeeze(1)
        tokens = tokens.masked_fill(done, pad)
        rows.append(tokens)
        done |= tokens == tok.eos_token_id
        ended = bool(done.all())
        if all_ended is not None:
            ended = all_ended(ended)
        if t == max_new_tokens - 1 or ended:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        logits, nxt = out.logits[:, -1].float(), nxt + 1
    gen = torch.stack(rows, dim=1).tolist()
    return [[to_completion(tok, gen[i * n + j]) for j in range(n)] for i in range(len(prompts))]
