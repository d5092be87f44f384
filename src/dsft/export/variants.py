"""Produce one export variant (int8, int4, nf4, bnb-int8, gguf-*) from the merged folder; check what can run here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsft.errors import ExportError

CPU_FORMATS = {"int8": "int8", "int4": "int4"}
BNB_FORMATS = {"nf4": "4-bit NF4 (QLoRA format)", "bnb-int8": "LLM.int8()"}
GGUF_FORMATS = {"gguf-f16": "f16", "gguf-q8_0": "q8_0", "gguf-q4_k_m": "q4_k_m"}


def _dir_size(p: Path, weights_only: bool = False) -> int:
    from dsft.export import dir_size

    return dir_size(p, weights_only=weights_only)


def check_formats_runnable(formats: list[str]) -> None:
    """Refuse, in one line and before any work, a format this machine cannot produce."""
    for fmt in formats:
        if fmt in BNB_FORMATS:
            _check_bnb(fmt)
        elif fmt in GGUF_FORMATS:
            from dsft.export.gguf import gguf_unavailable_reason

            why = gguf_unavailable_reason()
            if why:
                raise ExportError(f"export format '{fmt}': {why}")


def _check_bnb(fmt: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ExportError(f"export format '{fmt}' ({BNB_FORMATS[fmt]}, bitsandbytes) needs a CUDA GPU; this machine has none — "
                          f"on CPU use 'int4' / 'int8' (dsft CPU quantization) or 'gguf-q4_k_m' / 'gguf-q8_0' (llama.cpp)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ExportError(f"export format '{fmt}' needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from err


def make_variant(fmt: str, merged_dir: Path, out_dir: Path, *, tok=None) -> dict[str, Any]:
    """Build variant `fmt` under out_dir from merged_dir; return its manifest row (path relative to out_dir)."""
    t0 = time.perf_counter()
    if fmt in CPU_FORMATS:
        from dsft.export.quant import quantize_and_save

        dest = out_dir / fmt
        info = quantize_and_save(merged_dir, dest, CPU_FORMATS[fmt], tok=tok)
        row = {"name": fmt, "format": "dsft-quant", "path": fmt, "engine": "torch (dynamic int8 kernels)",
               "load": f"dsft.export.load_quantized('{fmt}')",
               "experts": f"{info['experts_split']} fused MoE expert blocks split per expert and quantized",
               "quantized_linear": info["quantized_linear"]}
    elif fmt in BNB_FORMATS:
        dest = out_dir / fmt
        row = _bnb_variant(fmt, merged_dir, dest, tok)
    elif fmt in GGUF_FORMATS:
        from dsft.export.gguf import make_gguf

        dest = out_dir / "gguf"
        row = make_gguf(merged_dir, dest, GGUF_FORMATS[fmt], tok=tok)
        row.update(name=fmt, path=str(Path("gguf") / row.pop("file")))
    else:
        raise ExportError(f"export format {fmt!r} is not known")
    row["size_bytes"] = _dir_size(out_dir / row["path"], weights_only=True)
    row["dir_bytes"] = _dir_size(out_dir / row["path"])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _bnb_variant(fmt: str, merged_dir: Path, dest: Path, tok) -> dict[str, Any]:
    """bitsandbytes NF4 / LLM.int8 on CUDA: quantizes nn.Linear only; fused MoE experts stay bf16."""
    _check_bnb(fmt)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if fmt == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.save_pretrained(str(dest), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(dest))
    return {"name": fmt, "format": "safetensors+bitsandbytes", "path": fmt, "engine": "transformers+bitsandbytes (CUDA)",
            "load": "AutoModelForCausalLM.from_pretrained(dir, device_map='cuda')",
            "experts": "fused 3-D MoE experts are not nn.Linear: bitsandbytes leaves them in bf16"}
