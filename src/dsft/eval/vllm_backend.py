"""Optional vLLM generation backend (GPU): same prompts and greedy settings as the transformers predictor.

Not exercised by the test suite (no GPU / no vllm on the CI machine). Differences from the transformers
path, recorded in the decoding settings: vLLM has no `no_repeat_ngram_size` (ignored), LoRA on fused MoE
experts cannot be applied by vLLM (merge the adapter first; see docs/eval.md).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.errors import ModelError


def vllm_available() -> bool:
    """vllm importable and a CUDA device present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def use_vllm(backend: str) -> bool:
    """Resolve cfg.eval.backend: 'vllm' must be available (else ModelError), 'auto' uses it when available."""
    if backend == "transformers":
        return False
    ok = vllm_available()
    if backend == "vllm" and not ok:
        raise ModelError("eval.backend: vllm asked for but not usable here (needs `pip install dsft[vllm]` and a CUDA GPU); "
                         "use eval.backend: transformers")
    return ok


def generate_vllm(model_dir: str | Path, tok, prompts: Sequence[list[dict[str, str]]], settings, *,
                  adapter_dir: str | Path | None = None, max_prompt_length: int | None = None,
                  gpu_memory_utilization: float = 0.5, trust_remote_code: bool = False) -> dict[str, Any]:
    """Generate with vLLM from token ids rendered by our chat template → {texts, seconds, new_tokens, settings}."""
    from vllm import LLM, SamplingParams

    from dsft.eval.predict import prompt_text

    ids = [tok(prompt_text(tok, m), add_special_tokens=False)["input_ids"] for m in prompts]
    if max_prompt_length:
        ids = [x[-max_prompt_length:] for x in ids]
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype="auto", enable_lora=adapter_dir is not None,
              gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code, seed=0)
    params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature if settings.do_sample else 0.0,
                            repetition_penalty=settings.repetition_penalty, skip_special_tokens=True)
    lora = None
    if adapter_dir is not None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("finetuned", 1, str(adapter_dir))
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, lora_request=lora, use_tqdm=False)
    seconds = time.perf_counter() - t0
    texts = [o.outputs[0].text.strip() for o in outs]
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    d = settings.as_dict()
    d.update(backend="vllm", no_repeat_ngram_size_applied=False)
    del llm
    return {"texts": texts, "seconds": seconds, "new_tokens": new_tokens, "settings": d}
