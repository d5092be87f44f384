"""Recognise and load any artefact dsft writes: plain HF folders, dsft int8/int4, bitsandbytes folders, GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

from dsft.errors import ModelError

KINDS = ("safetensors", "dsft-quant", "bitsandbytes", "gguf")


def artefact_kind(path: str | Path) -> str:
    """What a path holds: 'gguf' (a .gguf file), 'dsft-quant', 'bitsandbytes' or 'safetensors' (an HF folder)."""
    from dsft.model.quantized import is_quantized_dir

    p = Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise ModelError(f"{p}: expected a model folder or a .gguf file")
    if not p.is_dir():
        raise ModelError(f"model artefact {p} not found")
    if is_quantized_dir(p):
        return "dsft-quant"
    cfg = p / "config.json"
    if cfg.exists():
        q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
        if q.get("quant_method") == "bitsandbytes":
            return "bitsandbytes"
    return "safetensors"


def load_torch_artefact(path: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False):
    """A PyTorch model for a folder of any kind but GGUF (dsft int8/int4 and bitsandbytes load as stored; a plain
    folder in `dtype`). GGUF runs on llama.cpp instead: see dsft.model.gguf.load_gguf."""
    kind = artefact_kind(path)
    if kind == "gguf":
        raise ModelError(f"{path}: a GGUF file runs on llama.cpp (dsft.model.gguf.load_gguf), not PyTorch")
    if kind == "dsft-quant":
        from dsft.model.quantized import load_quantized

        return load_quantized(path)[0]
    if kind == "bitsandbytes":  # on the GPU, or bitsandbytes' CPU backend without CUDA
        from dsft.model.bnb import load_quantized_dir

        return load_quantized_dir(path, trust_remote_code=trust_remote_code)
    from dsft.model.load import load_model

    return load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
