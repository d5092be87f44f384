"""llama.cpp engine for GGUF files on CPU (optional extra `dsft[gguf]`): same API, one sequence at a time.

The FastAPI app, sampling (temperature, top_p, seed), stop strings, streaming and metrics are shared with
the transformers engine; llama.cpp evaluates the tokens. The chat template is the one stored in the GGUF
(`tokenizer.chat_template`) unless --chat-template names a DeepSeek template.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsft.errors import ServeError
from dsft.serve.engine import Engine, Sequence


class GgufTokenizer:
    """The small part of a Hugging Face tokenizer the server uses, over llama.cpp's own vocabulary."""

    def __init__(self, llm, chat_template: str | None):
        self.llm = llm
        self.chat_template = chat_template
        self.eos_token_id = int(llm.token_eos())
        self.bos_token_id = int(llm.token_bos())
        self.pad_token_id = self.eos_token_id
        self.eos_token = self._piece(self.eos_token_id)
        self.bos_token = self._piece(self.bos_token_id)

    def max_token_chars(self) -> int:
        """Bytes of the longest token (≥ its characters): see dsft.serve.engine.max_token_chars."""
        return max((len(self.llm.detokenize([i], special=True)) for i in range(len(self))), default=0)

    def _piece(self, tid: int) -> str:
        return self.llm.detokenize([tid], special=True).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return int(self.llm.n_vocab())

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": [int(i) for i in ids]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template or "").render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
            eos_token=self.eos_token)
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


class LlamaCppEngine(Engine):
    """Engine over a llama.cpp model: batch size 1 (requests queue), shared sampling and text handling."""

    def __init__(self, llm, tokenizer: GgufTokenizer, *, max_queue: int = 64, max_model_len: int | None = None,
                 on_token=None, on_first_token=None, **_ignored):
        import collections
        import threading

        import torch

        self.torch = torch
        self.llm = llm
        self.model = None
        self.tok = tokenizer
        self.max_batch_size = 1
        self.max_queue = max_queue
        self.adapters: list[str] = []
        self.mixed = True
        self.max_model_len = int(max_model_len or llm.n_ctx())
        self.max_prompt_chars = self.max_model_len * tokenizer.max_token_chars() or None
        self.eos_ids = {tokenizer.eos_token_id}
        eot = getattr(llm, "token_eot", None)
        if callable(eot) and int(eot()) >= 0:
            self.eos_ids.add(int(eot()))
        self.pad_id = tokenizer.pad_token_id
        self.device = torch.device("cpu")
        self.on_token, self.on_first_token = on_token, on_first_token
        self._pending: collections.deque[Sequence] = collections.deque()
        self._rows: list[Sequence] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = None
        self.steps = 0
        self.max_rows_seen = 0
        self._next: int | None = None

    def _logits(self):
        import numpy as np

        arr = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return self.torch.from_numpy(arr.copy()).float().view(1, -1)

    def _admit(self, new: list[Sequence]) -> None:
        s = new[0]
        if s.params.seed is not None:
            s.generator = self.torch.Generator(device="cpu").manual_seed(int(s.params.seed) % 2**64)
        self.llm.reset()
        self.llm.eval(s.context_ids())
        self._rows = [s]
        self.max_rows_seen = 1
        toks = self._sample(self._logits(), self._rows)
        self._next = toks[0]
        self._after_sample([0], toks)

    def _decode(self) -> None:
        self.llm.eval([self._next])
        toks = self._sample(self._logits(), self._rows)
        self._next = toks[0]
        self._after_sample([0], toks)
        self.steps += 1

    def _select(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]

    def _reset_batch(self) -> None:
        self._rows, self._next = [], None


def check_gguf(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix != ".gguf":
        raise ServeError(f"--engine llamacpp needs a .gguf file, got {p}")
    return p


def load_llamacpp_engine(path: str, *, chat_template: str | None = None, max_model_len: int | None = None,
                         **kwargs) -> LlamaCppEngine:
    """Load a GGUF file with llama-cpp-python (CPU) into an Engine-compatible object (not yet started)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ServeError("--engine llamacpp needs llama-cpp-python: pip install 'dsft[gguf]'") from err
    p = check_gguf(path)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    try:
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=max_model_len or 0, n_threads=threads, n_gpu_layers=0,
                              verbose=False, seed=0)
    except Exception as err:
        raise ServeError(f"{p}: llama.cpp cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if chat_template:
        from dsft.model.templates import get_template

        tpl = get_template(chat_template)
    else:
        tpl = (llm.metadata or {}).get("tokenizer.chat_template")
        if not tpl:
            from dsft.model.templates import get_template

            tpl = get_template("deepseek-v3")
    return LlamaCppEngine(llm, GgufTokenizer(llm, tpl), max_model_len=max_model_len, **kwargs)
