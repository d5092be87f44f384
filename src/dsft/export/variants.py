"""Produce one export variant (fp16, bf16, int8, int4, nf4, bnb-int8, gguf-*) from the merged folder; check what can run here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsft.errors import ExportError

HALF_FORMATS = {"fp16": "float16", "bf16": "bfloat16"}
CPU_FORMATS = {"int8": "int8", "int4": "int4"}
BNB_FORMATS = {"nf4": "4-bit NF4 (QLoRA format)", "bnb-int8": "LLM.int8()"}
GGUF_FORMATS = {"gguf-f16": "f16", "gguf-q8_0": "q8_0", "gguf-q4_k_m": "q4_k_m"}
KNOWN_FORMATS = ("merged", *HALF_FORMATS, *CPU_FORMATS, *BNB_FORMATS, *GGUF_FORMATS)


def dir_size(path: str | Path, *, weights_only: bool = False) -> int:
    """Bytes of every file under path (a file's own size when path is a file); weights_only: *.safetensors/*.gguf."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    files = [f for f in p.rglob("*") if f.is_file()]
    if weights_only:
        files = [f for f in files if f.suffix in (".safetensors", ".gguf")]
    return sum(f.stat().st_size for f in files)


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
    from dsft.model.bnb import bnb_missing_reason

    why = bnb_missing_reason()
    if why:
        raise ExportError(f"export format '{fmt}' ({BNB_FORMATS[fmt]}) {why}")


def make_variant(fmt: str, merged_dir: Path, out_dir: Path, *, tok=None, conversations=None) -> dict[str, Any]:
    """Build variant `fmt` under out_dir from merged_dir; return its manifest row (path relative to out_dir).
    `conversations`: probes of the fp16 overflow check (default: built-in ones)."""
    t0 = time.perf_counter()
    if fmt in HALF_FORMATS:
        row = _half_variant(fmt, merged_dir, out_dir / fmt, tok, conversations)
    elif fmt in CPU_FORMATS:
        from dsft.export.quant import quantize_and_save

        dest = out_dir / fmt
        info = quantize_and_save(merged_dir, dest, CPU_FORMATS[fmt], tok=tok)
        row = {"name": fmt, "format": "dsft-quant", "path": fmt, "engine": "torch (dynamic int8 kernels)",
               "load": f"dsft.model.quantized.load_quantized('{fmt}')",
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
    row["size_bytes"] = dir_size(out_dir / row["path"], weights_only=True)
    row["dir_bytes"] = dir_size(out_dir / row["path"])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _half_variant(fmt: str, merged_dir: Path, dest: Path, tok, conversations) -> dict[str, Any]:
    """The merged model saved in float16 / bfloat16 (plain transformers folder; fp16 refused on activation overflow)."""
    from dsft.export.merge import save_half

    dtype = HALF_FORMATS[fmt]
    info = save_half(merged_dir, dest, dtype, tok=tok, conversations=conversations)
    return {"name": fmt, "format": "safetensors", "dtype": dtype, "path": fmt, "engine": "transformers", **info}


def _bnb_variant(fmt: str, merged_dir: Path, dest: Path, tok) -> dict[str, Any]:
    """bitsandbytes NF4 / LLM.int8 on the GPU, or on its CPU backend when there is no CUDA; nn.Linear only."""
    _check_bnb(fmt)
    import torch
    from transformers import AutoModelForCausalLM

    from dsft.model import bnb

    q = bnb.quant_config(fmt)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), quantization_config=q, dtype=torch.bfloat16,
                                                     use_safetensors=True, device_map=bnb.device_map())
        model.save_pretrained(str(dest), safe_serialization=True)
    except Exception as err:
        raise ExportError(f"export format '{fmt}': bitsandbytes failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from err
    if tok is not None:
        tok.save_pretrained(str(dest))
    kept = "fused 3-D MoE experts are not nn.Linear: bitsandbytes leaves them in bf16 (lm_head too)"
    if fmt == "bnb-int8" and not bnb.on_cuda():
        kept += f"; {', '.join(bnb.CPU_INT8_SKIP)} also kept bf16 (bitsandbytes' CPU LLM.int8 cannot take its 4-D input)"
    load = ("AutoModelForCausalLM.from_pretrained(dir, device_map='cuda')" if bnb.on_cuda()
            else "dsft.model.bnb.load_quantized_dir(dir)")  # + the CPU repacking guard (see guard_cpu_packing)
    return {"name": fmt, "format": "safetensors+bitsandbytes", "path": fmt, "engine": bnb.engine(), "load": load,
            "experts": kept}
