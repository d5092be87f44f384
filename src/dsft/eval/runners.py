"""Engines the quantization report measures with: PyTorch models (plain, dsft int8/int4, bitsandbytes) and llama.cpp.

Both give the same two calls: `nll(ids, start)` (summed negative log-likelihood of ids[start:]) and
`generate_timed(ids, n)` (n greedy tokens, prefill seconds, decode seconds) on the clock they are given.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def hardware() -> str:
    """This machine's CPU model and logical CPU count (for the report's hardware column)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


class TorchRunner:
    """Measure a transformers model (plain, dsft-quantized or bitsandbytes) on its device."""

    engine = "torch"

    def __init__(self, model, clock=time.perf_counter) -> None:
        self.clock = clock
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def nll(self, ids: list[int], start: int) -> tuple[float, int]:
        import torch

        x = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=x, use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[start - 1:-1], dim=-1)
        tgt = x[0, start:]
        return float(-lp.gather(1, tgt[:, None]).sum()), int(tgt.numel())

    def generate_timed(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        import torch
        from transformers import DynamicCache

        with torch.no_grad():
            x = torch.tensor([ids], device=self.device)
            cache = DynamicCache(config=self.model.config)
            t0 = self.clock()
            out = self.model(input_ids=x, cache=cache, use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            t1 = self.clock()
            toks = [nxt]
            for _ in range(n - 1):
                out = self.model(input_ids=torch.tensor([[nxt]], device=self.device), cache=cache, use_cache=True)
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
            t2 = self.clock()
        return toks, t1 - t0, t2 - t1


class GGUFRunner:
    """Measure a GGUF file with llama.cpp: one context keeping all logits (perplexity), one for speed."""

    engine = "llama.cpp"

    def __init__(self, path: Path, threads: int, clock=time.perf_counter) -> None:
        from dsft.model.gguf import load_gguf

        self.clock = clock
        self.ppl_llm = load_gguf(path, n_ctx=512, logits_all=True, n_threads=threads)
        self.llm = load_gguf(path, n_ctx=512, logits_all=False, n_threads=threads)

    def nll(self, ids: list[int], start: int) -> tuple[float, int]:
        import numpy as np

        llm = self.ppl_llm
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)[start - 1:-1]
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        tgt = np.asarray(ids[start:])
        return float((lse - logits[np.arange(len(tgt)), tgt]).sum()), int(len(tgt))

    def generate_timed(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        import numpy as np

        from dsft.model.gguf import last_token_logits

        llm = self.llm
        llm.reset()
        t0 = self.clock()
        llm.eval(ids)
        nxt = int(np.argmax(last_token_logits(llm)))
        t1 = self.clock()
        toks = [nxt]
        for _ in range(n - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(last_token_logits(llm)))
            toks.append(nxt)
        t2 = self.clock()
        return toks, t1 - t0, t2 - t1
