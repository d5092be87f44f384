"""CPU quantization (dynamic int8; 4-bit storage) of Linear layers, fused MoE experts and embeddings; write the folder.

What happens to each part of a model (transformers 5.x module layout):
- every `nn.Linear` (attention/MLA projections, dense and shared-expert MLPs, `lm_head`): int8 weights with one
  scale per output channel, activations quantized per token at run time (`torch.ao` dynamic quantization, the
  fastest int8 path on this kind of CPU: fbgemm/x86 kernels);
- fused MoE experts (`mlp.experts.gate_up_proj` / `down_proj`, 3-D parameters that no torch/bitsandbytes/torchao
  CPU path quantizes): split into one Linear per expert, then quantized like any Linear — so the experts, most of
  a DeepSeek-V2/V3's weights, are int8 too; routing code is unchanged;
- the router (`mlp.gate`, not an `nn.Linear`), norms and biases: kept in fp32 (tiny, and routing is sensitive);
- token embeddings: 8-bit weight-only (per-row scale and offset).
The 4-bit variant stores Linear/expert weights as symmetric 4-bit groups of 32 (two per byte + an fp16 scale
per group, 4.5 bits a weight) and runs them on the same int8 kernels after unpacking (no fast 4-bit CPU
kernel exists in plain torch here): its file is ~½ of int8, its speed that of int8, its error that of 4-bit.
The folder format and its loader live in `dsft.model.quantized` (`load_quantized`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsft.errors import ExportError
from dsft.model import quantized as fmt
from dsft.run import atomic_dir

log = logging.getLogger(__name__)


def split_experts(model, *, check: bool = True) -> list[str]:
    """Replace every fused experts block with SplitExperts; the first is checked against the original on random input."""
    done = fmt.split_experts(model)
    if check and done:
        name, old, new = done[0]
        g = torch.Generator().manual_seed(0)
        e, _, h = old.gate_up_proj.shape
        x = torch.randn(6, h, generator=g)
        k = min(2, e)
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(6)])
        w = torch.rand(6, k, generator=g)
        with torch.no_grad():
            want, got = old.float()(x, idx, w), new(x, idx, w)
        if float((want - got).abs().max()) > 1e-4 * max(1.0, float(want.abs().max())):
            raise ExportError(f"{name}: fused MoE experts of {type(old).__name__} do not match the eager "
                              f"layout dsft splits (gate|up halves); cannot quantize them")
    return [name for name, _, _ in done]


def quantize_model(model, scheme: str = "int8") -> dict[str, Any]:
    """Quantize an fp32 model in place for CPU (see the module docstring). Returns the layout spec."""
    from torch.ao.quantization import (
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if scheme not in fmt.SCHEMES:
        raise ExportError(f"unknown CPU quantization scheme {scheme!r} (known: {', '.join(fmt.SCHEMES)})")
    model.float().eval()
    experts = split_experts(model)
    int4: dict[str, Any] = {}
    if scheme == "int4":
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    packed, scales = fmt.pack_int4(mod.weight)
                    int4[name] = (packed, scales, mod.in_features)
                    mod.weight.copy_(fmt.unpack_int4(packed, scales, mod.in_features))
    torch.backends.quantized.engine = fmt.quantized_engine()
    quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig},
                     inplace=True)
    return {"scheme": scheme, "experts": experts, "int4": int4}


def _quant_modules(model):
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    lin = {n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear)}
    emb = {n: m for n, m in model.named_modules() if isinstance(m, nnq.Embedding)}
    return lin, emb


def _tensors(model, spec: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], dict, dict]:
    """Every tensor the folder stores: int8 weights + scales (or packed 4-bit), 8-bit embeddings, the float rest."""
    lin, emb = _quant_modules(model)
    tensors: dict[str, Any] = {}
    for name, m in lin.items():
        w = m.weight()
        if spec["scheme"] == "int4":
            packed, scales, _ = spec["int4"][name]
            tensors[f"{name}.qweight4"], tensors[f"{name}.scales4"] = packed, scales
        else:
            tensors[f"{name}.qweight"] = w.int_repr().contiguous()
            tensors[f"{name}.scales"] = w.q_per_channel_scales().float().contiguous()
        b = m.bias()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().float().contiguous()
    for name, m in emb.items():
        w = m.weight()
        tensors[f"{name}.qweight"] = w.int_repr().contiguous()
        tensors[f"{name}.scales"] = w.q_per_channel_scales().float().contiguous()
        tensors[f"{name}.zero_points"] = w.q_per_channel_zero_points().float().contiguous()
    prefixes = tuple(f"{n}." for n in [*lin, *emb])
    for key, t in model.state_dict().items():
        if not key.startswith(prefixes) and hasattr(t, "dtype") and not t.is_quantized:
            tensors[key] = t.detach().clone().contiguous()
    return tensors, prefixes, lin, emb


def save_quantized(model, tok, out_dir: str | Path, spec: dict[str, Any], *, source: str | None = None) -> Path:
    """Write config + tokenizer + generation_config + quantized.safetensors + dsft_quant.json atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors, prefixes, lin, emb = _tensors(model, spec)
    meta = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "scheme": spec["scheme"],
        "group_size": fmt.GROUP if spec["scheme"] == "int4" else None,
        "linear": {n: [m.in_features, m.out_features] for n, m in lin.items()},
        "embedding": {n: [m.num_embeddings, m.embedding_dim] for n, m in emb.items()},
        "experts": spec["experts"], "kept_float": sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith(prefixes)}),
        "source": source, "load": "from dsft.model.quantized import load_quantized; model, tok = load_quantized(DIR)",
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / fmt.WEIGHTS), metadata={"format": fmt.FORMAT, "scheme": spec["scheme"]})
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / fmt.META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


def quantize_and_save(model_dir: str | Path, out_dir: str | Path, scheme: str, *, tok=None) -> dict[str, Any]:
    """Load an fp32/16 folder, quantize it for CPU, save it; returns {path, scheme, experts, quantized_linear}."""
    from dsft.model.load import load_model

    model = load_model(model_dir, dtype="float32", attn_implementation="sdpa")
    spec = quantize_model(model, scheme)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    save_quantized(model, tok, out_dir, spec, source=str(model_dir))
    lin, emb = _quant_modules(model)
    return {"path": str(out_dir), "scheme": scheme, "experts_split": len(spec["experts"]),
            "quantized_linear": len(lin), "quantized_embedding": len(emb)}
