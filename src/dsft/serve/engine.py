"""Transformers generation engine with continuous batching: one worker thread, shared forward passes.

Requests join the running batch between decode steps (their prompts are prefilled together, then their
KV cache is left-padded and concatenated onto the running one); finished, cancelled or stopped rows leave
the batch at once. Every row keeps its own sampling parameters (temperature, top_p, seed, stop strings)
and, with LoRA adapters loaded, its own adapter (PEFT mixed-adapter batches).

A failure fails only the request that caused it. A row whose sampling or text handling raises is dropped
alone; a prefill that raises is retried one new request at a time (the running batch is not touched); a
batched decode step that raises re-admits every running row on its own (prompt + tokens so far prefilled
again), so the row that keeps failing is the only one that gets an error and the others go on.
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
    isolate: bool = False  # admit alone (after a batched step failed): a failure then is this row's own

    def cancel(self) -> None:
        self.cancelled = True

    def context_ids(self) -> list[int]:
        """Tokens the KV cache must hold to sample the next one: the prompt and everything generated."""
        return self.prompt_ids + self.gen_ids


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could still become a stop string (held back while streaming)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def encode(tok, text: str, *, add_special_tokens: bool) -> list[int]:
    """tok(text)'s token ids, from any thread: a fast tokenizer's batch call releases the GIL while it works
    (measured: the wrapper's call held it 0.65 s on 1.5 M characters, the batch call 0.04 s)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # what tok(text) runs, minus the wrapper's per-token Python work
        return list(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def max_token_chars(tok) -> int:
    """The most characters one token of `tok` can stand for (0 when unknown).

    A prompt longer than max_model_len × this many characters cannot fit in the context, whatever it says, so
    it is refused without being tokenized. Vocabulary strings of byte-level BPE hold one character per byte, so
    they are never shorter than the text they decode to (a normalizer that shrank text would break the bound;
    DeepSeek's tokenizers have none)."""
    own = getattr(tok, "max_token_chars", None)
    if callable(own):
        return int(own())
    try:
        return max((len(t) for t in tok.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: no bound
        return 0


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
        self.max_prompt_chars = self.max_model_len * max_token_chars(tokenizer) or None
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
            if ".mlp.experts." in name and getattr(getattr(mod, "base_layer", None), "is_fp8", False):
                kind = "LoRA on FP8 routed experts (tokens regrouped per expert)"
            if kind.startswith("LoRA on FP8") or kind == "ParamWrapper" or (kind == "ModulesToSaveWrapper"
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

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return encode(self.tok, text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=True)

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
                # (no loop variable here: this frame lives as long as the engine and must not keep a request alive)
                new = self._live(new)
                try:
                    if new:
                        self._admit(new)
                    elif self._rows:
                        self._decode()
                except Exception as err:  # noqa: BLE001 - last resort (the steps isolate failures themselves)
                    log.exception("generation step failed")
                    self._fail_all(self._rows + new, err)
                    self._reset_batch()
                new = []

    def _take(self, free: int) -> list[Sequence]:
        """Waiting requests to admit now (FIFO; per-adapter batches when adapters cannot be mixed; a request
        to be isolated after a failed step alone)."""
        if free <= 0 or not self._pending:
            return []
        if self._pending[0].isolate:
            return [self._pending.popleft()]
        if self.mixed:
            take = []
            while self._pending and len(take) < free and not self._pending[0].isolate:
                take.append(self._pending.popleft())
            return take
        head = self._pending[0]
        cur = self._rows[0].adapter if self._rows else head.adapter
        if head.adapter != cur and time.perf_counter() - head.t_submit > self.adapter_switch_wait_s:
            return []  # the oldest request waits for another adapter: let the batch drain, then switch
        take = [s for s in self._pending if s.adapter == cur and not s.isolate][:free]
        for s in take:
            self._pending.remove(s)
        return take

    @staticmethod
    def _live(seqs: list[Sequence]) -> list[Sequence]:
        """The requests not cancelled meanwhile (cancelled ones are marked done)."""
        for s in seqs:
            if s.cancelled:
                s.done = True
        return [s for s in seqs if not s.done]

    def _fail_all(self, seqs: list[Sequence], err: BaseException) -> None:
        for s in seqs:
            self._fail(s, err)

    def _fail(self, s: Sequence, err: BaseException) -> None:
        """End one request with an error event (the batch goes on without it)."""
        log.error("request failed in the engine: %s: %s", type(err).__name__, err, exc_info=err)
        if not s.done:
            s.done = True
            s.emit(Event("error", text=f"generation failed: {type(err).__name__}: {str(err)[:300]}"))

    def _requeue_isolated(self, seqs: list[Sequence]) -> None:
        """Put requests back at the head of the queue, each to be admitted on its own."""
        with self._cv:
            for s in reversed(seqs):
                if not s.done:
                    s.isolate = True
                    self._pending.appendleft(s)

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
        """Prefill new requests (or rows re-admitted after a failure) and join them to the running batch."""
        for s in new:
            if s.params.seed is not None and s.generator is None:
                try:
                    s.generator = self.torch.Generator(device="cpu").manual_seed(int(s.params.seed) % 2**64)
                except Exception as err:  # noqa: BLE001 - the request's own seed: fail it alone
                    self._fail(s, err)
        new = [s for s in new if not s.done]
        if not new:
            return
        try:  # touches no shared state: a failure here concerns the new requests only
            logits, cache, mask = self._prefill(new)
        except Exception as err:  # noqa: BLE001
            if len(new) == 1:
                self._fail(new[0], err)
            else:
                self._requeue_isolated(new)
            return
        for s in new:
            s.isolate = False
        old = list(self._rows)
        try:
            self._join(new, logits, cache, mask)
        except Exception as err:  # noqa: BLE001 - the joining requests fail; the batch they broke is rebuilt
            for s in new:
                self._fail(s, err)
            self._recover(old)

    def _prefill(self, new: list[Sequence]):
        from transformers import DynamicCache

        torch = self.torch
        ctx = [s.context_ids() for s in new]
        lmax = max(len(c) for c in ctx)
        ids = torch.full((len(new), lmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), lmax), dtype=torch.long)
        for i, c in enumerate(ctx):
            ids[i, lmax - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, lmax - len(c):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        logits, cache = self._forward(ids, mask, pos, DynamicCache(), [s.adapter for s in new])
        return logits, cache, mask

    def _join(self, new: list[Sequence], logits, cache, mask) -> None:
        torch = self.torch
        next_pos = mask.sum(-1)
        if self._rows:
            self._merge(new, cache, mask, next_pos)
        else:
            self._rows, self._cache, self._mask, self._pos = list(new), cache, mask, next_pos
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        # sample the next token only for the new rows (the old rows keep their pending last token)
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

    def _recover(self, rows: list[Sequence]) -> None:
        """After a batched step failed: drop the batch state and re-admit every live row on its own."""
        self._reset_batch()
        self._requeue_isolated([s for s in rows if not s.done and not s.cancelled])
        for s in rows:
            if s.cancelled:
                s.done = True

    def _decode(self) -> None:
        torch = self.torch
        b = len(self._rows)
        mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], 1)
        try:
            logits, cache = self._forward(self._last, mask, self._pos.view(-1, 1), self._cache,
                                          [s.adapter for s in self._rows])
        except Exception as err:  # noqa: BLE001 - which row caused it is unknown: step each row alone
            log.warning("batched decode step failed (%s: %s); stepping its %d rows one by one",
                        type(err).__name__, err, b)
            logits, cache, mask = self._decode_each(mask)
            if logits is None:
                return
        self._mask, self._cache = mask, cache
        self._pos = self._pos + 1
        toks = self._sample(logits, self._rows)
        self._last = torch.tensor(toks, dtype=torch.long, device=self.device).view(-1, 1)
        self._after_sample(list(range(len(self._rows))), toks)
        self.steps += 1

    def _decode_each(self, mask):
        """One decode step per row on its own slice of the cache; rows that fail alone leave with an error.

        Returns (logits, cache, mask) of the rows that went on (None when none did)."""
        from transformers import DynamicCache

        torch = self.torch
        t = self._mask.shape[1]
        for layer in self._cache.layers:  # a failed forward may have appended this step to some layers
            layer.keys, layer.values = layer.keys[..., :t, :], layer.values[..., :t, :]
        ok, logits, caches = [], [], []
        for i, s in enumerate(self._rows):
            one = DynamicCache()
            for li, layer in enumerate(self._cache.layers):
                one.update(layer.keys[i:i + 1], layer.values[i:i + 1], li)
            try:
                lg, c = self._forward(self._last[i:i + 1], mask[i:i + 1], self._pos[i:i + 1].view(-1, 1), one,
                                      [s.adapter])
            except Exception as err:  # noqa: BLE001
                self._fail(s, err)
                continue
            ok.append(i)
            logits.append(lg)
            caches.append(c)
        if not ok:
            self._reset_batch()
            return None, None, None
        for li, layer in enumerate(caches[0].layers):
            layer.keys = torch.cat([c.layers[li].keys for c in caches], 0)
            layer.values = torch.cat([c.layers[li].values for c in caches], 0)
        ix = torch.tensor(ok, dtype=torch.long, device=self.device)
        self._pos, self._last = self._pos.index_select(0, ix), self._last.index_select(0, ix)
        self._rows = [self._rows[i] for i in ok]
        return torch.cat(logits, 0), caches[0], mask.index_select(0, ix)

    def _sample(self, logits, seqs: list[Sequence]) -> list[int]:
        out: list[int] = []
        greedy = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            try:
                out.append(self._sample_row(logits[i], s, greedy[i]))
            except Exception as err:  # noqa: BLE001 - this row's sampling alone
                self._fail(s, err)
                out.append(self.pad_id)  # placeholder: the row leaves the batch in _after_sample
        return out

    def _sample_row(self, logits, s: Sequence, greedy: int) -> int:
        torch = self.torch
        p = s.params
        if p.temperature <= 1e-5:
            return int(greedy)
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            cum = sp.cumsum(-1)
            sp[(cum - sp) > p.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs.cpu(), 1, generator=s.generator).item())

    def _after_sample(self, idx: list[int], toks: list[int]) -> None:
        """Append tokens, emit text, and drop finished (or failed) rows from the batch."""
        now = time.perf_counter()
        for i, t in zip(idx, toks, strict=True):
            s = self._rows[i]
            if s.cancelled:
                s.done = True
            if s.done:
                continue
            try:
                self._take_token(s, t, now)
            except Exception as err:  # noqa: BLE001 - e.g. a decode error: this row alone
                self._fail(s, err)
        keep = [i for i, s in enumerate(self._rows) if not s.done]
        if len(keep) < len(self._rows):
            self._select(keep)

    def _take_token(self, s: Sequence, t: int, now: float) -> None:
        if s.t_first is None:
            s.t_first = now
            if self.on_first_token:
                self.on_first_token(now - s.t_submit)
        if t in self.eos_ids:
            self._finish(s, "stop", flush=True)
            return
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
            return
        if len(s.gen_ids) >= s.params.max_tokens or len(s.prompt_ids) + len(s.gen_ids) >= self.max_model_len:
            self._finish(s, "length", flush=True)
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return
        upto = len(text) - _stop_holdback(text, s.params.stop)
        if upto > s.sent:
            s.emit(Event("delta", text=text[s.sent:upto]))
            s.sent = upto

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
