"""dsft's CPU int8 / int4 folder format (written by `dsft export`): its layout, the split MoE experts, and the loader.

A folder holds `config.json`, the tokenizer, `generation_config.json`, `quantized.safetensors` and `dsft_quant.json`
(which modules are int8 / packed 4-bit / 8-bit embeddings, which stayed float, which fused experts were split).
`dsft.export.quant` writes it; `load_quantized` here reloads it bit-identically for any stage (eval, serve, you).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsft.errors import ModelError

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


def set_module(model, name: str, new) -> None:
    """Replace the submodule `name` (dotted path) of model by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def split_experts(model) -> list[tuple[str, Any, SplitExperts]]:
    """Replace every fused experts block with SplitExperts; return (name, old module, new module) per block."""
    done = []
    for name in [n for n, m in model.named_modules() if is_fused_experts(m)]:
        old = model.get_submodule(name)
        new = SplitExperts.from_fused(old)
        set_module(model, name, new)
        done.append((name, old, new))
    return done


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


def quantized_engine() -> str:
    """torch's quantized kernel backend for this CPU (x86, else fbgemm, else whatever is there)."""
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else engines[0])


def is_quantized_dir(path: str | Path) -> bool:
    """True for a folder written by dsft's int8/int4 export."""
    return (Path(path) / META).exists()


# ----------------------------------------------------------------------------------------------- load
def read_meta(model_dir: Path) -> dict[str, Any]:
    """dsft_quant.json of a folder, checked for format and version (one-line ModelError otherwise)."""
    meta_p = Path(model_dir) / META
    if not meta_p.exists():
        raise ModelError(f"{model_dir}: no {META}; not a dsft quantized folder (load plain folders with transformers)")
    meta = json.loads(meta_p.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(f"{meta_p}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}")
    return meta


def _quantized_linear(name: str, in_f: int, out_f: int, scheme: str, t: dict[str, Any]):
    """One dynamic-int8 Linear rebuilt from the stored tensors (int4: unpacked, then the export's own observer)."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig

    bias = t.pop(f"{name}.bias", None)
    if scheme == "int4":
        # unpack to float, then the very same observer/kernels the export used (bit-identical reload)
        lin = nn.Linear(in_f, out_f, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(unpack_int4(t.pop(f"{name}.qweight4"), t.pop(f"{name}.scales4"), in_f))
            if bias is not None:
                lin.bias.copy_(bias)
        lin.qconfig = per_channel_dynamic_qconfig
        return nnqd.Linear.from_float(lin)
    q, s = t.pop(f"{name}.qweight"), t.pop(f"{name}.scales")
    qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(out_f, dtype=torch.long), 0)
    new = nnqd.Linear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    new.set_weight_bias(qw, bias)
    return new


def _copy_float_rest(model, t: dict[str, Any], weights: Path) -> None:
    """Norms, routers and biases of kept modules, tensor by tensor (quantized modules' own state-dict loading
    would expect torch-pickle-only keys)."""
    expected = {k for k, v in model.state_dict().items() if not getattr(v, "is_quantized", False)
                and "_packed_params" not in k and not k.endswith((".scale", ".zero_point"))}
    unexpected, missing = sorted(set(t) - expected), sorted(expected - set(t))
    if unexpected or missing:
        raise ModelError(f"{weights}: tensors do not match the model (unexpected {unexpected[:3]}, missing {missing[:3]})")
    with torch.no_grad():
        for key, value in t.items():
            mod_name, _, attr = key.rpartition(".")
            target = getattr(model.get_submodule(mod_name) if mod_name else model, attr)
            if tuple(target.shape) != tuple(value.shape):
                raise ModelError(f"{weights}: {key} has shape {tuple(value.shape)}, the config says {tuple(target.shape)}")
            target.copy_(value)


def load_quantized(model_dir: str | Path):
    """Reload a dsft int8/int4 folder → (model, tokenizer), ready to generate on CPU."""
    import torch.ao.nn.quantized as nnq
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    torch.backends.quantized.engine = quantized_engine()
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    model.eval()
    split_experts(model)
    t = load_file(str(model_dir / WEIGHTS))
    for name, (in_f, out_f) in meta["linear"].items():
        set_module(model, name, _quantized_linear(name, in_f, out_f, meta["scheme"], t))
    for name, (n, d) in meta["embedding"].items():
        q, s, z = t.pop(f"{name}.qweight"), t.pop(f"{name}.scales"), t.pop(f"{name}.zero_points")
        qw = torch._make_per_channel_quantized_tensor(q, s, z, 0)
        set_module(model, name, nnq.Embedding(n, d, dtype=torch.quint8, _weight=qw))
    _copy_float_rest(model, t, model_dir / WEIGHTS)
    if (model_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model, AutoTokenizer.from_pretrained(str(model_dir))
