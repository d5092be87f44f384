"""bitsandbytes NF4 / LLM.int8 on CUDA or on its CPU backend: availability, configs, loading, CPU workarounds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

BNB_MIN = "0.49"
"""Oldest bitsandbytes whose CPU backend dsft verified (NF4 train/export/reload, LLM.int8 export/reload); 0.48.0's
CPU LLM.int8 reloaded with different outputs than it saved."""
PIP_HINT = f"pip install 'bitsandbytes>={BNB_MIN}'"

CPU_PACK_BLOCK_N = 32
"""bitsandbytes' AVX512-BF16 inference repacking needs out_features % 32 == 0 and in_features % blocksize == 0."""
CPU_INT8_SKIP = ("kv_b_proj",)
"""Kept unquantized by LLM.int8 on CPU: DeepSeek MLA feeds kv_b_proj a 4-D tensor, which bitsandbytes' CPU int8
quantizer cannot take ("The size of tensor a (…) must match the size of tensor b (…) at non-singleton dimension 2")."""

log = logging.getLogger("dsft.bnb")


def bnb_missing_reason() -> str | None:
    """None when a usable bitsandbytes is importable, else one line with the pip command."""
    # bitsandbytes' CPU backend logs at import that the optional hub `kernels` package is absent; that kernel is
    # only a speed-up (and would be fetched from the hub, which dsft never does), so keep it out of the console
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        return f"needs bitsandbytes: {PIP_HINT}"
    except Exception as err:  # a broken native library raises RuntimeError/OSError at import
        return f"bitsandbytes does not load here ({type(err).__name__}: {str(err).splitlines()[0][:160]}); {PIP_HINT}"
    have = _version_tuple(getattr(bitsandbytes, "__version__", "0"))
    if not on_cuda() and have < _version_tuple(BNB_MIN):
        return f"bitsandbytes {bitsandbytes.__version__} has no CPU backend; {PIP_HINT}"
    return None


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_map() -> dict[str, Any]:
    """Where bitsandbytes layers go: the first GPU when CUDA is present, else the CPU backend."""
    return {"": 0} if on_cuda() else {"": "cpu"}


def engine() -> str:
    return "transformers+bitsandbytes (CUDA)" if on_cuda() else "transformers+bitsandbytes CPU backend"


def compute_dtype(training: bool):
    """NF4 compute dtype: bf16 on CUDA; on CPU fp32 for training (steadier loss), bf16 for inference (fused kernel)."""
    import torch

    if on_cuda() or not training:
        return torch.bfloat16
    return torch.float32


def quant_config(fmt: str, *, training: bool = False):
    """BitsAndBytesConfig for 'nf4' (double-quantized NF4) or 'bnb-int8' (LLM.int8, threshold 6)."""
    from transformers import BitsAndBytesConfig

    if fmt == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(training))
    if fmt == "bnb-int8":
        skip = None if on_cuda() else ["lm_head", *CPU_INT8_SKIP]
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"not a bitsandbytes format: {fmt!r}")


def guard_cpu_packing(model, *, training: bool) -> int:
    """Turn off bitsandbytes' CPU inference repacking where it would fail or break training; return how many layers.

    On CPUs with AVX512-BF16, Linear4bit repacks its weight in place on the first no-grad eval-mode call. That
    asserts out_features % 32 == 0 and fails for in_features < blocksize (the tiny model's kv_a_proj_with_mqa 48,
    kv_b_proj 32 → 192), and once packed, later training forwards bypass autograd. No-op on CUDA.
    """
    if on_cuda():
        return 0
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if not isinstance(mod, Linear4bit) or not getattr(mod, "support_avx512bf16_for_cpu", False):
            continue
        qs = getattr(mod.weight, "quant_state", None)
        block = getattr(qs, "blocksize", 64) or 64
        if training or mod.out_features % CPU_PACK_BLOCK_N or mod.in_features % block:
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_quantized_dir(path: str | Path, *, trust_remote_code: bool = False):
    """Reload a folder written by save_pretrained of a bitsandbytes model, on the GPU or the CPU backend."""
    from transformers import AutoModelForCausalLM

    from dsft.errors import ModelError

    why = bnb_missing_reason()
    if why:
        raise ModelError(f"{path}: bitsandbytes variant {why}")
    quiet_int8_cast_warning()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map=device_map(), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"{path}: cannot load the bitsandbytes model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    guard_cpu_packing(model, training=False)
    return model.eval()


def quiet_int8_cast_warning() -> None:
    """LLM.int8 logs 'inputs will be cast … to float16' on every matmul of a non-fp16 model; keep it to errors."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
