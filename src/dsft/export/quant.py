"""CPU quantization (dynamic int8; 4-bit storage) of Linear layers, fused MoE experts and embeddings; save/load.

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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsft.errors import ExportError
from dsft.run import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "dsft-quant"
VERSION = 1
WEIGHTS = "quantized.safetensors"
META = "dsft_quant.json"
GROUP = 32
SCHEMES = ("int8", "int4")


class SplitExperts(nn.Module):
    """Fused 3-D MoE experts as one Linear pair per expert, with transformers' eager routing semantics."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.gate_up = nn.ModuleList(nn.Linear(hidden, 2 * inter, bias=False) for _ in range(num_experts))
        self.down = nn.ModuleList(nn.Linear(inter, hidden, bias=False) for _ in range(num_experts))

    @classmethod
    def from_fused(cls, mod) -> SplitExperts:
        e, two_i, h = mod.gate_up_proj.shape
        new = cls(e, h, two_i // 2, mod.act_fn)
        with torch.no_grad():
            for i in range(e):
                new.gate_up[i].weight.copy_(mod.gate_up_proj[i].float())
                new.down[i].weight.copy_(mod.down_proj[i].float())
        return new

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token_idx, k_pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            gate, up = self.gate_up[e](x).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(mod) -> bool:
    """A transformers-5 fused experts block this module knows how to split (DeepSeek V2/V3 layout, no biases)."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if gu is None or dn is None or not hasattr(mod, "act_fn") or getattr(mod, "gate_up_proj_bias", None) is not None:
        return False
    if getattr(gu, "ndim", 0) != 3 or getattr(dn, "ndim", 0) != 3:
        return False
    e, two_i, h = gu.shape
    return tuple(dn.shape) == (e, h, two_i // 2) and two_i % 2 == 0


def _set_module(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def split_experts(model, *, check: bool = True) -> list[str]:
    """Replace every fused experts block with SplitExperts (checked against the original on random input)."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for i, name in enumerate(names):
        old = model.get_submodule(name)
        new = SplitExperts.from_fused(old)
        if check and i == 0:
            g = torch.Generator().manual_seed(0)
            h = old.gate_up_proj.shape[-1]
            x = torch.randn(6, h, generator=g)
            k = min(2, old.gate_up_proj.shape[0])
            idx = torch.stack([torch.randperm(old.gate_up_proj.shape[0], generator=g)[:k] for _ in range(6)])
            w = torch.rand(6, k, generator=g)
            with torch.no_grad():
                want, got = old.float()(x, idx, w), new(x, idx, w)
            if float((want - got).abs().max()) > 1e-4 * max(1.0, float(want.abs().max())):
                raise ExportError(f"{name}: fused MoE experts of {type(old).__name__} do not match the eager "
                                  f"layout dsft splits (gate|up halves); cannot quantize them")
        _set_module(model, name, new)
    return names


# ----------------------------------------------------------------------------------------------- 4-bit groups
def pack_int4(w) -> tuple[Any, Any]:
    """Symmetric 4-bit groups of GROUP along the input dim: (uint8 [out, in_pad/2], fp16 scales [out, in_pad/GROUP])."""
    out_f, in_f = w.shape
    pad = (-in_f) % GROUP
    wp = torch.nn.functional.pad(w.float(), (0, pad)).view(out_f, -1, GROUP)
    scale = (wp.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-8).half()
    q = torch.round(wp / scale.float()).clamp(-8, 7).to(torch.int16) + 8
    q = q.view(out_f, -1).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).contiguous()


def unpack_int4(packed, scales, in_features: int):
    """Inverse of pack_int4 (fp32 [out, in_features])."""
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([lo, hi], dim=-1).view(packed.shape[0], -1).float()
    w = (q.view(packed.shape[0], -1, GROUP) * scales.float().unsqueeze(-1)).view(packed.shape[0], -1)
    return w[:, :in_features].contiguous()


# ----------------------------------------------------------------------------------------------- quantize
def quantize_model(model, scheme: str = "int8") -> dict[str, Any]:
    """Quantize an fp32 model in place for CPU (see the module docstring). Returns the layout spec."""
    from torch.ao.quantization import (
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if scheme not in SCHEMES:
        raise ExportError(f"unknown CPU quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    model.float().eval()
    experts = split_experts(model)
    int4: dict[str, Any] = {}
    if scheme == "int4":
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    packed, scales = pack_int4(mod.weight)
                    int4[name] = (packed, scales, mod.in_features)
                    mod.weight.copy_(unpack_int4(packed, scales, mod.in_features))
    torch.backends.quantized.engine = _engine()
    quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig},
                     inplace=True)
    model._dsft_int4 = int4  # kept for save_quantized (the packed 4-bit weights are what gets written)
    return {"scheme": scheme, "experts": experts}


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else engines[0])


def _quant_modules(model):
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    lin = {n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear)}
    emb = {n: m for n, m in model.named_modules() if isinstance(m, nnq.Embedding)}
    return lin, emb


def save_quantized(model, tok, out_dir: str | Path, spec: dict[str, Any], *, source: str | None = None) -> Path:
    """Write config + tokenizer + generation_config + quantized.safetensors + dsft_quant.json atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    lin, emb = _quant_modules(model)
    int4 = getattr(model, "_dsft_int4", {}) or {}
    tensors: dict[str, Any] = {}
    for name, m in lin.items():
        w = m.weight()
        if spec["scheme"] == "int4":
            packed, scales, in_f = int4[name]
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
    meta = {
        "format": FORMAT, "version": VERSION, "scheme": spec["scheme"], "group_size": GROUP if spec["scheme"] == "int4" else None,
        "linear": {n: [m.in_features, m.out_features] for n, m in lin.items()},
        "embedding": {n: [m.num_embeddings, m.embedding_dim] for n, m in emb.items()},
        "experts": spec["experts"], "kept_float": sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith(prefixes)}),
        "source": source, "load": "from dsft.export.quant import load_quantized; model, tok = load_quantized(DIR)",
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "scheme": spec["scheme"]})
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
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


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / META).exists()


def load_quantized(model_dir: str | Path):
    """Reload a folder written by save_quantized → (model, tokenizer), ready to generate on CPU."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    from safetensors.torch import load_file
    from torch.ao.quantization import per_channel_dynamic_qconfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    model_dir = Path(model_dir)
    meta_p = model_dir / META
    if not meta_p.exists():
        raise ExportError(f"{model_dir}: no {META}; not a dsft quantized folder (load plain folders with transformers)")
    meta = json.loads(meta_p.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ExportError(f"{meta_p}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}")
    torch.backends.quantized.engine = _engine()
    cfg = AutoConfig.from_pretrained(str(model_dir))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    split_experts(model, check=False)
    t = load_file(str(model_dir / WEIGHTS))
    for name, (in_f, out_f) in meta["linear"].items():
        bias = t.pop(f"{name}.bias", None)
        if meta["scheme"] == "int4":
            # unpack to float, then the very same observer/kernels quantize_model used (bit-identical reload)
            lin = nn.Linear(in_f, out_f, bias=bias is not None)
            with torch.no_grad():
                lin.weight.copy_(unpack_int4(t.pop(f"{name}.qweight4"), t.pop(f"{name}.scales4"), in_f))
                if bias is not None:
                    lin.bias.copy_(bias)
            lin.qconfig = per_channel_dynamic_qconfig
            new = nnqd.Linear.from_float(lin)
        else:
            q, s = t.pop(f"{name}.qweight"), t.pop(f"{name}.scales")
            qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(out_f, dtype=torch.long), 0)
            new = nnqd.Linear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
            new.set_weight_bias(qw, bias)
        _set_module(model, name, new)
    for name, (n, d) in meta["embedding"].items():
        q, s, z = t.pop(f"{name}.qweight"), t.pop(f"{name}.scales"), t.pop(f"{name}.zero_points")
        qw = torch._make_per_channel_quantized_tensor(q, s, z, 0)
        new = nnq.Embedding(n, d, dtype=torch.quint8, _weight=qw)
        _set_module(model, name, new)
    # the float rest (norms, router, biases of kept modules): copied tensor by tensor; quantized modules'
    # own _load_from_state_dict would expect torch-pickle-only keys.
    expected = {k for k, v in model.state_dict().items() if not getattr(v, "is_quantized", False)
                and "_packed_params" not in k and not k.endswith((".scale", ".zero_point"))}
    unexpected = sorted(set(t) - expected)
    missing = sorted(expected - set(t))
    if unexpected or missing:
        raise ExportError(f"{model_dir / WEIGHTS}: tensors do not match the model "
                          f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
    with torch.no_grad():
        for key, value in t.items():
            mod_name, _, attr = key.rpartition(".")
            target = getattr(model.get_submodule(mod_name) if mod_name else model, attr)
            if tuple(target.shape) != tuple(value.shape):
                raise ExportError(f"{model_dir / WEIGHTS}: {key} has shape {tuple(value.shape)}, the config says {tuple(target.shape)}")
            target.copy_(value)
    if (model_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tok
