"""Transformers generation engine with continuous batching: one worker thread, shared forward passes.

Requests join the running batch between decode steps (their prompts are prefilled together, then their
KV cache is left-padded and concatenated onto the running one); finished, cancelled or stopped rows leave
the batch at once. Every row keeps its own sampling parameters (temperature, top_p, seed, stop strings)
and, with LoRA adapters loaded, its own adapter (PEFT mixed-adapter batches).
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dsft.serve")

BASE_ADAPTER = "__base__"


class EngineOverloaded(Exception):
    """The waiting queue is full (→ HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and accepts no new request (→ HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """What a request receives from the engine: text deltas, then one finish (or an error)."""

    kind: str  # "delta" | "finish" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str = BASE_ADAPTER
    gen_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of decoded text already emitted
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: Any = None

    def cancel(self) -> None:
        self.cancelled = True


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could still become a stop string (held back while streaming)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


class Engine:
    """A causal LM (optionally with named LoRA adapters) behind a continuous-batching worker thread."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, adapters: list[str] | None = None,
                 on_token: Callable[[int], None] | None = None, on_first_token: Callable[[float], None] | None = None):
        import torch

        self.torch = torch
        self.model = model
        self.tok = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapters = list(adapters or [])
        cfg = model.config
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", 0) or 2048)
        eos = set()
        for src in (getattr(model, "generation_config", None), cfg):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                eos.add(e)
            elif isinstance(e, (list, tuple)):
                eos.update(int(x) for x in e)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers ≥ 5.2x renames `past_key_values` to `cache` model by model
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.on_token = on_token
        self.on_first_token = on_first_token
        self._pending: collections.deque[Sequence] = collections.deque()
        self._rows: list[Sequence] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_rows_seen = 0
        self.adapter_switch_wait_s = 2.0
        # Can one forward pass mix adapters (PEFT `adapter_names`)? Not when an adapter trains norms or
        # fused MoE experts (modules_to_save / target_parameters): then each batch holds one adapter.
        self.mixed = self._probe_mixed() if self.adapters else True
        # batch state (owned by the worker thread)
        self._cache = None
        self._mask = None
        self._pos = None
        self._last = None

    def _probe_mixed(self) -> bool:
        """PEFT mixes adapters in one batch only for LoRA on Linear/Embedding layers and modules_to_save of
        those types (a failed trial forward would leave PEFT's hooks behind, so this checks the modules)."""
        import torch.nn as nn

        for name, mod in self.model.named_modules():
            kind = type(mod).__name__
            if kind == "ParamWrapper" or (kind == "ModulesToSaveWrapper"
                                          and not isinstance(getattr(mod, "original_module", None), (nn.Linear, nn.Embedding))):
                log.info("adapters cannot share a forward pass (%s on %s); batching per adapter", kind, name)
                return False
        return True

    # ---- public API (any thread) ------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsft-engine", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> Sequence:
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._pending)} requests are waiting (max_queue={self.max_queue})")
            self._pending.append(seq)
            self._cv.notify()
        return seq

    def stop(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop accepting requests; with drain, finish the queued and running ones first."""
        with self._cv:
            self._stopping = True
            if not drain:
                for s in list(self._pending) + self._rows:
                    s.cancelled = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    # ---- worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch = self.torch
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._pending and not self._rows and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._pending and not self._rows:
                        return
                    new = self._take(self.max_batch_size - len(self._rows))
                new = [s for s in new if not s.cancelled]
                try:
                    if new:
                        self._admit(new)
                    elif self._rows:
                        self._decode()
                except Exception as err:  # a failed step must not kill the server: fail the rows in it
                    log.exception("generation step failed")
                    for s in self._rows + new:
                        if not s.done:
                            s.done = True
                            s.emit(Event("error", text=f"generation failed: {type(err).__name__}: {err}"))
                    self._reset_batch()

    def _take(self, free: int) -> list[Sequence]:
        """Waiting requests to admit now (FIFO; per-adapter batches when adapters cannot be mixed)."""
        if free <= 0 or not self._pending:
            return []
        if self.mixed:
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
        head = self._pending[0]
        cur = self._rows[0].adapter if self._rows else head.adapter
        if head.adapter != cur and time.perf_counter() - head.t_submit > self.adapter_switch_wait_s:
            return []  # the oldest request waits for another adapter: let the batch drain, then switch
        take = [s for s in self._pending if s.adapter == cur][:free]
        for s in take:
            self._pending.remove(s)
        return take

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    def _forward(self, ids, mask, pos, cache, adapters: list[str]):
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                      logits_to_keep=1)
        kwargs[self._cache_kw] = cache
        if self.adapters and self.mixed:
            kwargs["adapter_names"] = adapters
            out = self.model(**kwargs)
        elif self.adapters and adapters[0] == BASE_ADAPTER:
            with self.model.disable_adapter():
                out = self.model(**kwargs)
        elif self.adapters:
            if self.model.active_adapter != adapters[0]:
                self.model.set_adapter(adapters[0])
            out = self.model(**kwargs)
        else:
            out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
        return out.logits[:, -1, :].float(), new_cache

    def _admit(self, new: list[Sequence]) -> None:
        from transformers import DynamicCache

        torch = self.torch
        lmax = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), lmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), lmax), dtype=torch.long)
        for i, s in enumerate(new):
            n = len(s.prompt_ids)
            ids[i, lmax - n:] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[i, lmax - n:] = 1
            if s.params.seed is not None:
                s.generator = torch.Generator(device="cpu").manual_seed(int(s.params.seed))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        logits, cache = self._forward(ids, mask, pos, DynamicCache(), [s.adapter for s in new])
        next_pos = mask.sum(-1)
        if self._rows:
            self._merge(new, cache, mask, next_pos)
        else:
            self._rows, self._cache, self._mask, self._pos = list(new), cache, mask, next_pos
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        # sample the first token only for the new rows (the old rows keep their pending last token)
        first = self._sample(logits, new)
        k = len(self._rows) - len(new)
        last = torch.tensor(first, dtype=torch.long, device=self.device).view(-1, 1)
        self._last = last if self._last is None or k == 0 else torch.cat([self._last, last], 0)
        self._after_sample(list(range(k, len(self._rows))), first)

    def _merge(self, new: list[Sequence], cache, mask, next_pos) -> None:
        torch = self.torch
        ta, tn = self._mask.shape[1], mask.shape[1]
        t = max(ta, tn)

        def lpad(x, n):  # left-pad dim -2 (cache) or dim 1 (mask) with zeros
            if n == 0:
                return x
            if x.dim() == 2:
                return torch.cat([x.new_zeros(x.shape[0], n), x], 1)
            shape = list(x.shape)
            shape[-2] = n
            return torch.cat([x.new_zeros(shape), x], -2)

        for la, ln in zip(self._cache.layers, cache.layers, strict=True):
            la.keys = torch.cat([lpad(la.keys, t - ta), lpad(ln.keys, t - tn)], 0)
            la.values = torch.cat([lpad(la.values, t - ta), lpad(ln.values, t - tn)], 0)
        self._mask = torch.cat([lpad(self._mask, t - ta), lpad(mask, t - tn)], 0)
        self._pos = torch.cat([self._pos, next_pos], 0)
        self._rows = self._rows + list(new)

    def _decode(self) -> None:
        torch = self.torch
        b = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], 1)
        logits, self._cache = self._forward(self._last, self._mask, self._pos.view(-1, 1), self._cache,
                                            [s.adapter for s in self._rows])
        self._pos = self._pos + 1
        toks = self._sample(logits, self._rows)
        self._last = torch.tensor(toks, dtype=torch.long, device=self.device).view(-1, 1)
        self._after_sample(list(range(b)), toks)
        self.steps += 1

    def _sample(self, logits, seqs: list[Sequence]) -> list[int]:
        torch = self.torch
        out: list[int] = []
        greedy = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature <= 1e-5:
                out.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1)
            if p.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                cum = sp.cumsum(-1)
                sp[(cum - sp) > p.top_p] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            out.append(int(torch.multinomial(probs.cpu(), 1, generator=s.generator).item()))
        return out

    def _after_sample(self, idx: list[int], toks: list[int]) -> None:
        """Append tokens, emit text, and drop finished rows from the batch."""
        now = time.perf_counter()
        for i, t in zip(idx, toks, strict=True):
            s = self._rows[i]
            if s.cancelled:
                s.done = True
                continue
            if s.t_first is None:
                s.t_first = now
                if self.on_first_token:
                    self.on_first_token(now - s.t_submit)
            if t in self.eos_ids:
                self._finish(s, "stop", flush=True)
                continue
            s.gen_ids.append(t)
            if self.on_token:
                self.on_token(1)
            text = self.tok.decode(s.gen_ids, skip_special_tokens=True)
            hit = [text.find(x) for x in s.params.stop if x and x in text]
            if hit:
                cut = min(hit)
                if cut > s.sent:
                    s.emit(Event("delta", text=text[s.sent:cut]))
                s.sent = cut
                self._finish(s, "stop", flush=False)
                continue
            if len(s.gen_ids) >= s.params.max_tokens or len(s.prompt_ids) + len(s.gen_ids) >= self.max_model_len:
                self._finish(s, "length", flush=True)
                continue
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                continue
            upto = len(text) - _stop_holdback(text, s.params.stop)
            if upto > s.sent:
                s.emit(Event("delta", text=text[s.sent:upto]))
                s.sent = upto
        keep = [i for i, s in enumerate(self._rows) if not s.done]
        if len(keep) < len(self._rows):
            self._select(keep)

    def _finish(self, s: Sequence, reason: str, *, flush: bool) -> None:
        if flush:
            text = self.tok.decode(s.gen_ids, skip_special_tokens=True).rstrip("\ufffd")
            if len(text) > s.sent:
                s.emit(Event("delta", text=text[s.sent:]))
                s.sent = len(text)
        s.done = True
        s.emit(Event("finish", finish_reason=reason, prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.gen_ids)))

    def _select(self, keep: list[int]) -> None:
        torch = self.torch
        if not keep:
            self._reset_batch()
            return
        ix = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, ix)
        cols = mask.any(0).nonzero()
        start = int(cols[0]) if len(cols) else 0  # drop columns that are padding for every remaining row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, ix)[..., start:, :]
            layer.values = layer.values.index_select(0, ix)[..., start:, :]
        self._mask = mask[:, start:]
        self._pos = self._pos.index_select(0, ix)
        self._last = self._last.index_select(0, ix)
        self._rows = [self._rows[i] for i in keep]


def load_engine(model_dir: str | Path, *, adapters: dict[str, str] | None = None, dtype: str = "auto",
                chat_template: str | None = None, trust_remote_code: bool = False, **kwargs) -> Engine:
    """Load a local model folder (+ named LoRA adapter folders) into an Engine (not yet started)."""
    from dsft.errors import DsftError, ServeError
    from dsft.model.load import load_model, resolve_model_dir
    from dsft.model.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(str(model_dir))
    tok = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code, chat_template=chat_template)
    if tok.chat_template is None:
        from dsft.model.templates import get_template

        tok.chat_template = get_template("deepseek-v3")
        log.warning("%s: tokenizer has no chat template; using DeepSeek-V3's", model_dir)
    model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    names = list((adapters or {}).keys())
    if adapters:
        from dsft.model.adapters import load_named_adapters

        try:
            model = load_named_adapters(model, adapters)
        except DsftError as err:
            raise ServeError(str(err)) from err
    import torch

    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return Engine(model, tok, adapters=names, **kwargs)
