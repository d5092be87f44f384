"""Load GGUF files with llama.cpp (optional extra `dsft[gguf]`, llama-cpp-python) and read their logits.

The one place that touches llama-cpp-python's low-level context: export (verification), eval (measurement) and
serve (the llamacpp engine) all read last-token logits through `last_token_logits`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsft.errors import ModelError

INSTALL = "pip install 'dsft[gguf]' (llama-cpp-python, an sdist that compiles llama.cpp, ≈ 20 min on 2 cores)"


def llama_cpp_missing_reason() -> str | None:
    """None when llama-cpp-python imports, else one line saying what to install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed; {INSTALL}"
    return None


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else every logical CPU."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))


def load_gguf(path: str | Path, *, n_ctx: int = 512, logits_all: bool = True, n_threads: int | None = None):
    """A llama.cpp model over a .gguf file on CPU (fixed seed; logits_all keeps every position's logits)."""
    why = llama_cpp_missing_reason()
    if why:
        raise ModelError(f"{path}: {why}")
    import llama_cpp

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"GGUF file {p} not found")
    threads = n_threads or default_threads()
    try:
        return llama_cpp.Llama(model_path=str(p), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                               n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, seed=0)
    except Exception as err:  # llama.cpp raises ValueError/RuntimeError for files it cannot read
        raise ModelError(f"{p}: llama.cpp cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def last_token_logits(llm):
    """Logits (numpy float32 view, copy before the next eval) of the last evaluated position, with or without
    logits_all: llama-cpp-python keeps them only in its low-level context, so this is the one place that reads it."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def greedy_tokens(llm, ids: list[int], n: int, *, stop_at_eos: bool = True) -> list[int]:
    """Greedy continuation (token ids) of ids with llama.cpp: n tokens, or fewer when EOS comes first."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    eos = llm.token_eos()
    for _ in range(n):
        nxt = int(np.argmax(last_token_logits(llm)))
        out.append(nxt)
        if stop_at_eos and nxt == eos:
            break
        if len(out) < n:
            llm.eval([nxt])
    return out
