"""Whether vLLM can run here, and the engine arguments every in-process vLLM user shares (eval, GRPO rollouts).

Imports vLLM only inside the functions (probing the platform takes seconds), never at module level.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

# KV cache of vLLM's CPU build when $VLLM_CPU_KVCACHE_SPACE is not set (vLLM would read gpu_memory_utilization as
# a share of all RAM)
CPU_KV_CACHE_BYTES = 4 << 30


def vllm_device() -> str | None:
    """'cuda' or 'cpu' when vLLM can generate here (vLLM's CUDA build with a GPU, or its CPU build), else None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.platforms import current_platform
    except Exception:  # a broken install is "not usable", like a missing one
        return None
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else None
        except ImportError:  # pragma: no cover
            return None
    return None


def vllm_available() -> bool:
    """vllm importable and usable: a CUDA device, or vLLM's CPU build (its CPU platform is active)."""
    return vllm_device() is not None


def vllm_dtype(dtype: str) -> str:
    """dsft's dtype name → vLLM's, with 'auto' resolved as dsft's loader does (bf16 on a bf16 GPU, else fp32;
    vLLM's own 'auto' would turn an fp32 checkpoint into bf16/fp16)."""
    if dtype == "auto":
        from dsft.model.load import torch_dtype

        return str(torch_dtype("auto")).removeprefix("torch.")
    return dtype


def vllm_memory_kwargs(device: str | None, gpu_memory_utilization: float,
                       cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES) -> dict[str, Any]:
    """vllm.LLM's memory arguments: on the CPU build the KV cache in bytes (unless $VLLM_CPU_KVCACHE_SPACE sizes it),
    on a GPU the share of its memory vLLM may take."""
    if device == "cpu":
        return {} if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else {"kv_cache_memory_bytes": cpu_kv_cache_bytes}
    return {"gpu_memory_utilization": gpu_memory_utilization}


def child_pids() -> set[int]:
    """The pids of this process's live multiprocessing children (taken before an engine starts, see stop_engine)."""
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children() if p.pid is not None}


def stop_engine(llm, before: set[int], timeout: float = 30.0) -> None:
    """Shut a vllm.LLM's engine down and wait until the engine-core processes it started (children not in `before`)
    have exited. vLLM's shutdown sends SIGTERM, waits 5 s, then SIGKILLs without waiting: on a loaded machine the
    process can still be alive (tearing down its memory) when the next engine starts beside it."""
    import multiprocessing

    llm.llm_engine.engine_core.shutdown()
    for p in multiprocessing.active_children():
        if p.pid not in before:
            p.join(timeout)
