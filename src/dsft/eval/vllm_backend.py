"""Optional vLLM generation backend: same prompts and greedy settings as the transformers predictor.

Runs on a CUDA GPU, or on CPU with vLLM's CPU build (`make test-vllm` checks that greedy texts match the
transformers predictor in fp32 on tiny Llama/Qwen2 models). Differences from the transformers path, recorded in
the decoding settings: vLLM has no `no_repeat_ngram_size` (ignored), LoRA on fused MoE experts cannot be applied
by vLLM (merge the adapter first; see docs/eval.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.errors import ModelError
from dsft.model.vllm_platform import (
    child_pids,
    stop_engine,
    vllm_available,
    vllm_device,
    vllm_dtype,
    vllm_memory_kwargs,
)

__all__ = ["generate_vllm", "use_vllm", "vllm_available", "vllm_device"]


def use_vllm(backend: str) -> bool:
    """Resolve cfg.eval.backend: 'vllm' must be available (else ModelError), 'auto' uses it when available."""
    if backend == "transformers":
        return False
    ok = vllm_available()
    if backend == "vllm" and not ok:
        raise ModelError("eval.backend: vllm asked for but not usable here (needs `pip install dsft[vllm]` and a CUDA "
                         "GPU, or vLLM's CPU build); use eval.backend: transformers")
    return ok


def generate_vllm(model_dir: str | Path, tok, prompts: Sequence[list[dict[str, str]]], settings, *,
                  adapter_dir: str | Path | None = None, max_prompt_length: int | None = None,
                  gpu_memory_utilization: float = 0.5, trust_remote_code: bool = False,
                  dtype: str = "auto", max_model_len: int | None = None) -> dict[str, Any]:
    """Generate with vLLM from token ids rendered by our chat template → {texts, seconds, new_tokens, settings}.

    On vLLM's CPU build the KV cache is sized in bytes ($VLLM_CPU_KVCACHE_SPACE GiB, else 4 GiB) instead of
    gpu_memory_utilization (which vLLM would read as a share of all RAM)."""
    from vllm import LLM, SamplingParams

    from dsft.eval.predict import prompt_text
    from dsft.model.adapters import lora_rank
    from dsft.model.vllm_args import vllm_max_lora_rank

    ids = [tok(prompt_text(tok, m), add_special_tokens=False)["input_ids"] for m in prompts]
    if max_prompt_length:
        ids = [x[-max_prompt_length:] for x in ids]
    kw: dict[str, Any] = vllm_memory_kwargs(vllm_device(), gpu_memory_utilization)
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if adapter_dir is not None:
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_max_lora_rank(lora_rank(adapter_dir) or 16))
    before = child_pids()
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=vllm_dtype(dtype),
              trust_remote_code=trust_remote_code, seed=0, **kw)
    try:
        params = SamplingParams(max_tokens=settings.max_new_tokens,
                                temperature=settings.temperature if settings.do_sample else 0.0,
                                repetition_penalty=settings.repetition_penalty, skip_special_tokens=True)
        lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("finetuned", 1, str(adapter_dir))
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        # stop the engine-core process now (a second LLM — base, then fine-tuned — would otherwise start
        # beside it and hold a second KV cache)
        stop_engine(llm, before)
        del llm
    texts = [o.outputs[0].text.strip() for o in outs]
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    d = settings.as_dict()
    d.update(backend="vllm", no_repeat_ngram_size_applied=False)
    return {"texts": texts, "seconds": seconds, "new_tokens": new_tokens, "settings": d}
