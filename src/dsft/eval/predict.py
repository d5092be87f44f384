"""Predictors over a causal LM: answer loss, batched greedy generation (left padding), label log-likelihoods.

All prompts are rendered with the tokenizer's chat template, exactly as the train stage renders them
(`dsft.records` builds the messages); the scored continuation is the assistant turn as the template writes it
(text + end-of-turn token).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dsft.report.progress import bar

Messages = list[dict[str, str]]


def prompt_text(tok, messages: Messages) -> str:
    """The chat-template text of `messages` followed by the assistant generation prompt."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def continuation_text(tok, messages: Messages, answer: str) -> tuple[str, str]:
    """(prompt text, assistant continuation text as the template renders it, end-of-turn token included)."""
    prompt = prompt_text(tok, messages)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if full.startswith(prompt) and len(full) > len(prompt):
        return prompt, full[len(prompt):]
    return prompt, answer + (tok.eos_token or "")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        import torch

        return torch.device("cpu")


def continuation_logprobs(model, tok, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                          max_length: int | None = None, progress: str | None = "eval scoring") -> list[tuple[float, int]]:
    """For each (prompt ids, continuation ids): (sum of log p(continuation | prompt), number of tokens scored).

    Sequences longer than max_length lose prompt tokens from the left (the continuation is kept). Batches are
    built from length-sorted items and **left-padded** (position ids from the attention mask), so every
    continuation ends at the last position and the LM head runs only on the last `max continuation + 1`
    positions (`logits_to_keep`) — with DeepSeek's 129 k vocabulary the head dominates the cost, and a
    label is a handful of tokens after a long prompt. Results come back in input order.
    """
    import torch

    device = _model_device(model)
    pad = _pad_id(tok)
    seqs = []
    for p, c in pairs:
        if max_length and len(p) + len(c) > max_length:
            keep_p = max(1, max_length - len(c))
            p = p[-keep_p:]
            c = c[: max_length - len(p)]
        seqs.append((p, c))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    was_training = model.training
    model.eval()
    pbar = bar(progress or "", total=len(seqs), unit=" seq", leave=False, enabled=None if progress else False)
    with torch.inference_mode(), pbar:
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            L = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
            K = max(len(seqs[i][1]) for i in idx)  # scored positions: the last K tokens of the window
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            att = torch.zeros((len(idx), L), dtype=torch.long)
            tgt = torch.full((len(idx), K), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                p, c = seqs[i]
                full = p + c
                ids[row, L - len(full):] = torch.tensor(full)
                att[row, L - len(full):] = 1
                if c:
                    tgt[row, K - len(c):] = torch.tensor(c)
            pos = (att.cumsum(-1) - 1).clamp(min=0)
            logits = _last_logits(model, ids.to(device), att.to(device), pos.to(device), K + 1)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position L-K-1+j predicts token L-K+j
            labels = tgt.to(device)
            mask = labels != -100
            tok_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            sums, counts = tok_lp.sum(-1).tolist(), mask.sum(-1).tolist()
            for row, i in enumerate(idx):
                out[i] = (float(sums[row]), int(counts[row]))
            pbar.update(len(idx))
    model.train(was_training)
    return out


def shared_prefix_logprobs(model, tok, groups: Sequence[tuple[list[int], Sequence[list[int]]]], *,
                           batch_size: int = 8, max_length: int | None = None, progress: str | None = "eval labels",
                           ) -> list[list[tuple[float, int]]]:
    """For each (prompt ids, [continuation ids …]): per continuation (sum of log p(continuation | prompt), tokens).

    The same numbers as `continuation_logprobs` on every (prompt, continuation) pair, but each prompt runs once:
    `batch_size` prompts go through the model left-padded with a KV cache, the cache is repeated once per
    continuation, and the continuations run as one short right-padded batch on it. Label scoring (11 departments
    after a 60–90-token question) computes several times fewer tokens. With max_length, a prompt loses tokens from
    the left to fit next to its longest continuation, so all its continuations see the same prompt window. Models
    whose forward takes no cache fall back to the pairwise scorer.
    """
    import torch

    device = _model_device(model)
    pad = _pad_id(tok)
    cut = []
    for p, conts in groups:
        K = max((len(c) for c in conts), default=0)
        if max_length and len(p) + K > max_length:
            p = p[-max(1, max_length - K):]
        cut.append((p, [c[: (max_length - len(p)) if max_length else None] for c in conts]))
    order = sorted(range(len(cut)), key=lambda i: len(cut[i][0]))
    out: list[list[tuple[float, int]]] = [[] for _ in cut]
    was_training = model.training
    model.eval()
    pbar = bar(progress or "", total=len(cut), unit=" prompt", leave=False, enabled=None if progress else False)
    with torch.inference_mode(), pbar:
        for b in range(0, len(order), max(1, batch_size)):
            idx = [i for i in order[b: b + max(1, batch_size)]]
            chunk = [cut[i] for i in idx]
            try:
                res = _score_prompts(model, chunk, pad, device)
            except (TypeError, AttributeError, NotImplementedError):  # no cache / no batch_repeat_interleave
                flat = continuation_logprobs(model, tok, [(p, c) for p, cs in chunk for c in cs], progress=None)
                res, k = [], 0
                for _, cs in chunk:
                    res.append(flat[k:k + len(cs)])
                    k += len(cs)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
            pbar.update(len(idx))
    model.train(was_training)
    return out


def _score_prompts(model, chunk: list[tuple[list[int], list[list[int]]]], pad: int, device) -> list[list[tuple[float, int]]]:
    """Prompts left-padded in one forward with a cache, then every continuation of every prompt as one right-padded
    batch on the cache repeated per continuation: position len(prompt)+j predicts continuation token j+1."""
    import torch

    B, L = len(chunk), max(len(p) for p, _ in chunk)
    ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for r, (p, _) in enumerate(chunk):
        ids[r, L - len(p):] = torch.tensor(p)
        att[r, L - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    first = model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device), use_cache=True,
                  logits_to_keep=1)
    lp_first = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # each prompt's next-token distribution
    rows = [(r, c) for r, (_, cs) in enumerate(chunk) for c in cs]
    sums = [float(lp_first[r, c[0]]) if c else 0.0 for r, c in rows]
    K = max((len(c) for _, c in rows), default=0)
    if K > 1:
        counts = [len(cs) for _, cs in chunk]
        cache = first.past_key_values
        if len(set(counts)) == 1:
            cache.batch_repeat_interleave(counts[0])
        else:
            cache.batch_select_indices(torch.tensor([r for r, _ in rows], device=device))
        n = len(rows)
        ids2 = torch.full((n, K - 1), pad, dtype=torch.long)
        att2 = torch.cat([att[[r for r, _ in rows]], torch.zeros((n, K - 1), dtype=torch.long)], dim=1)
        tgt = torch.full((n, K - 1), -100, dtype=torch.long)
        for k, (_, c) in enumerate(rows):
            if len(c) > 1:
                ids2[k, :len(c) - 1] = torch.tensor(c[:-1])
                att2[k, L:L + len(c) - 1] = 1
                tgt[k, :len(c) - 1] = torch.tensor(c[1:])
        start = torch.tensor([len(chunk[r][0]) for r, _ in rows]).unsqueeze(1)
        pos2 = start + torch.arange(K - 1).unsqueeze(0)
        logits = model(input_ids=ids2.to(device), attention_mask=att2.to(device), position_ids=pos2.to(device),
                       past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        labels = tgt.to(device)
        mask = labels != -100
        rest = (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1).tolist()
        sums = [a + b for a, b in zip(sums, rest, strict=True)]
    res: list[list[tuple[float, int]]] = [[] for _ in chunk]
    for (r, c), s in zip(rows, sums, strict=True):
        res[r].append((s, len(c)))
    return res


def _last_logits(model, ids, att, pos, keep: int):
    """Logits of the last `keep` positions; models without `logits_to_keep` compute all and are sliced."""
    try:
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
    return logits[:, -keep:]


def answer_loss(model, tok, items: Sequence[tuple[Messages, str]], *, batch_size: int = 8,
                max_length: int | None = None, progress: str | None = "eval loss") -> dict[str, Any]:
    """Token-weighted mean NLL of each reference answer given its prompt → {loss, perplexity, tokens, per_item}."""
    pairs = []
    for msgs, answer in items:
        p, c = continuation_text(tok, msgs, answer)
        pairs.append((_ids(tok, p), _ids(tok, c)))
    res = continuation_logprobs(model, tok, pairs, batch_size=batch_size, max_length=max_length, progress=progress)
    nll = -sum(s for s, _ in res)
    n = sum(k for _, k in res)
    loss = nll / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n else float("nan"), "tokens": n,
            "per_item": [(-s / k if k else None) for s, k in res]}


def label_scores(model, tok, prompts: Sequence[Messages], labels: Sequence[str], *, batch_size: int = 8,
                 max_length: int | None = None, mean: bool = False,
                 progress: str | None = "eval labels") -> list[dict[str, float]]:
    """For each prompt, {label: log p(label turn | prompt)} (label text + end-of-turn token; summed, or per-token mean)."""
    groups = [(_ids(tok, prompt_text(tok, msgs)), [_ids(tok, continuation_text(tok, msgs, lab)[1]) for lab in labels])
              for msgs in prompts]
    res = shared_prefix_logprobs(model, tok, groups, batch_size=batch_size, max_length=max_length, progress=progress)
    return [{lab: (s / max(k, 1) if mean else s) for lab, (s, k) in zip(labels, r, strict=True)} for r in res]


def classify(model, tok, prompts: Sequence[Messages], labels: Sequence[str], **kw) -> tuple[list[str], list[dict[str, float]]]:
    """Pick the most likely label per prompt; return (predictions, probabilities over labels)."""
    from dsft.eval.metrics import softmax

    scores = label_scores(model, tok, prompts, labels, **kw)
    probs = [softmax(s) for s in scores]
    preds = [max(p, key=p.get) for p in probs]
    return preds, probs


def multiple_choice(model, tok, prompts: Sequence[Messages], choices: Sequence[Sequence[str]], *,
                    normalize: bool = False, **kw) -> list[int]:
    """Index of the most likely choice per prompt (sum log-prob; per-token mean when normalize)."""
    groups = [(_ids(tok, prompt_text(tok, msgs)), [_ids(tok, continuation_text(tok, msgs, opt)[1]) for opt in opts])
              for msgs, opts in zip(prompts, choices, strict=True)]
    res = shared_prefix_logprobs(model, tok, groups, **kw)
    best = []
    for r in res:
        vals = [s / max(k, 1) if normalize else s for s, k in r]
        best.append(max(range(len(vals)), key=vals.__getitem__) if vals else -1)
    return best


@dataclass
class GenerationSettings:
    """Decoding settings, recorded next to every generation result."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("max_new_tokens", "do_sample", "temperature", "no_repeat_ngram_size",
                                           "repetition_penalty", "batch_size")}
        d.update(self.extra)
        return d


def generate(model, tok, prompts: Sequence[Messages], settings: GenerationSettings, *,
             max_prompt_length: int | None = None, progress: str | None = "eval generate") -> dict[str, Any]:
    """Batched generation with left padding → {texts, seconds, new_tokens, settings}."""
    import torch

    device = _model_device(model)
    pad = _pad_id(tok)
    encoded = [_ids(tok, prompt_text(tok, m)) for m in prompts]
    if max_prompt_length:
        encoded = [e[-max_prompt_length:] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    new_tokens = 0
    eos = tok.eos_token_id
    gen_kw: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                              "pad_token_id": pad, "eos_token_id": eos}
    if settings.do_sample:
        gen_kw["temperature"] = settings.temperature
    else:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    if settings.no_repeat_ngram_size:
        gen_kw["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    if settings.repetition_penalty != 1.0:
        gen_kw["repetition_penalty"] = settings.repetition_penalty
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    pbar = bar(progress or "", total=len(encoded), unit=" prompt", leave=False, enabled=None if progress else False)
    with torch.inference_mode(), pbar:
        for b in range(0, len(order), settings.batch_size):
            idx = order[b: b + settings.batch_size]
            L = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            att = torch.zeros((len(idx), L), dtype=torch.long)
            for row, i in enumerate(idx):
                e = encoded[i]
                ids[row, L - len(e):] = torch.tensor(e)
                att[row, L - len(e):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **gen_kw)
            for row, i in enumerate(idx):
                new = out[row, L:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                while new and new[-1] == pad:
                    new.pop()
                new_tokens += len(new)
                texts[i] = tok.decode(new, skip_special_tokens=True).strip()
            pbar.update(len(idx))
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return {"texts": texts, "seconds": seconds, "new_tokens": new_tokens, "settings": settings.as_dict()}
