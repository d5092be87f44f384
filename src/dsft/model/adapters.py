"""LoRA adapters on DeepSeek (MLA + MoE), Llama and Qwen2 models: target discovery, attach, load, merge.

Shared by train (attach), eval and export (load/merge) so every stage sees adapters the same way.

Why not plain `get_peft_model(model, LoraConfig(target_modules=[...]))`: PEFT 0.21 on transformers 5.x
rewrites any target named `gate_proj`/`up_proj`/`down_proj` of a DeepSeek model into the fused expert
parameters, so layer-0's dense MLP and the shared experts silently get no LoRA (see shared NOTES.md).
dsft computes the exact list itself (full module names + expert parameters) and attaches it with that
rewrite switched off; `load_adapter` does the same so an adapter reloads onto exactly the modules it
was trained on.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.errors import ModelError

# Attention projections of each family (MLA for DeepSeek V2/V3; q/k/v/o for Llama-shape and Qwen2-shape).
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLA_PROJECTIONS)
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
MTP_PROJECTIONS = ("eh_proj",)  # DeepSeek-V3's MTP layer, attached for train.mtp_loss_weight > 0 (dsft.model.fp8_mtp)
# Never adapted: the MoE router (kept frozen and fp32), the LM head and embeddings (trained fully via
# modules_to_save when asked), and anything named like a router.
_ROUTER_RE = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")
# Norms, for modules_to_save on tiny random-init models.
NORM_SUFFIXES = ("norm", "layernorm")


@dataclass
class AdapterTargets:
    """What an adapter will wrap: full module names (nn.Linear) and fused 3-D expert parameters."""

    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for name in [*self.modules, *self.parameters]:
            kinds[_kind(name)] = kinds.get(_kind(name), 0) + 1
        return {"modules": len(self.modules), "expert_parameters": len(self.parameters), "by_kind": kinds,
                "skipped": self.skipped}


def _kind(name: str) -> str:
    if ".experts." in name and "shared" not in name:
        return "routed_experts"
    if "shared_expert" in name:
        return "shared_experts"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in MTP_PROJECTIONS:
        return "mtp"
    if leaf in ATTN_PROJECTIONS:
        return "attention"
    if leaf in MLP_PROJECTIONS:
        return "dense_mlp"
    return "other"


def auto_target_modules(model, *, include_experts: bool = True) -> AdapterTargets:
    """Every attention projection, dense MLP and shared-expert nn.Linear, plus fused routed-expert parameters.

    Routers (`mlp.gate`), the LM head and embeddings are left out. Works on DeepseekV2/V3 (MLA + MoE),
    Llama-shape (DeepSeek-LLM/Coder, R1-Distill-Llama) and Qwen2-shape (R1-Distill-Qwen) models.
    """
    import torch.nn as nn

    out = AdapterTargets()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if mod is head or leaf == "lm_head":
                continue
            if _ROUTER_RE.search(name):
                out.skipped[name] = "router (kept frozen)"
                continue
            if leaf in ATTN_PROJECTIONS or leaf in MLP_PROJECTIONS or leaf in MTP_PROJECTIONS:
                out.modules.append(name)
            else:
                out.skipped[name] = "not a known projection"
        elif type(mod).__name__.endswith("Experts"):
            for pname, p in mod.named_parameters(recurse=False):
                if p.ndim == 3:
                    if include_experts:
                        out.parameters.append(f"{name}.{pname}")
                    else:
                        out.skipped[f"{name}.{pname}"] = "fused experts (not supported with this method)"
    return out


def resolve_targets(model, target_modules: str | list[str], *, include_experts: bool = True) -> AdapterTargets:
    """`auto` → auto_target_modules; a list of leaf names or regexes → the matching modules and expert params."""
    if target_modules == "auto":
        return auto_target_modules(model, include_experts=include_experts)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    full = auto_target_modules(model, include_experts=include_experts)
    pats = [re.compile(rf"(^|\.)({t})$") for t in target_modules]
    out = AdapterTargets(skipped=dict(full.skipped))
    out.modules = [n for n in full.modules if any(p.search(n) for p in pats)]
    for n in full.parameters:
        # an expert parameter counts as matched by its own leaf name (gate_up_proj/down_proj) or by the
        # per-expert projections it fuses (gate_proj/up_proj for gate_up_proj)
        leaf = n.rsplit(".", 1)[-1]
        aliases = {leaf, *({"gate_proj", "up_proj", "experts"} if leaf == "gate_up_proj" else {"experts"})}
        if any(p.search(n) for p in pats) or any(p.search(a) for p in pats for a in aliases):
            out.parameters.append(n)
    if not out.modules and not out.parameters:
        raise ModelError(f"lora.target_modules {target_modules}: matches no module of this model "
                         f"(auto would adapt e.g. {', '.join(sorted({m.rsplit('.', 1)[-1] for m in full.modules}))})")
    return out


def default_modules_to_save(model) -> list[str]:
    """Module names trained fully next to LoRA for tiny random-init models: embeddings, LM head, norms."""
    names = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head") or (leaf.endswith(NORM_SUFFIXES) and sum(1 for _ in mod.parameters(recurse=False))):
            names.add(leaf)
    return sorted(names)


@contextlib.contextmanager
def exact_targets() -> Iterator[None]:
    """Switch off PEFT's v4→v5 MoE target rewrite while dsft passes exact names (see module docstring)."""
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:  # older/newer PEFT without the rewrite
        yield
        return
    orig = conv.convert_peft_config_for_transformers
    orig_sd = getattr(conv, "convert_peft_adapter_state_dict_for_transformers", None)

    def keep_fp8_keys(model, peft_config, adapter_state_dict, adapter_name="default"):
        from dsft.model.fp8_linear import has_fp8

        if has_fp8(model):  # an FP8 base keeps DeepSeek's per-expert modules: the saved keys already match them
            return adapter_state_dict
        return orig_sd(model=model, peft_config=peft_config, adapter_state_dict=adapter_state_dict, adapter_name=adapter_name)

    conv.convert_peft_config_for_transformers = lambda *a, **k: None
    if orig_sd is not None:
        conv.convert_peft_adapter_state_dict_for_transformers = keep_fp8_keys
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = orig
        if orig_sd is not None:
            conv.convert_peft_adapter_state_dict_for_transformers = orig_sd




def attach_lora(model, cfg, *, targets: AdapterTargets | None = None, modules_to_save: list[str] | None = None,
                r: int | None = None, alpha: float | None = None, use_dora: bool | None = None,
                use_rslora: bool | None = None, dropout: float | None = None):
    """Wrap `model` with a LoRA adapter described by a `LoraConfig` section (dsft.config) → (peft_model, targets).

    B is zero-initialised (PEFT default), so the wrapped model equals the base before training.
    Dropout applies to nn.Linear adapters; PEFT does not support dropout on fused expert parameters, so
    those get none. DoRA does not support expert parameters either: they are skipped (and reported).
    """
    import torch.nn as nn
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    r = r or cfg.r  # no hidden default: the rank comes resolved (dsft.config.resolve) or is passed
    if not r:
        raise ModelError("attach_lora: no LoRA rank (lora.r is unset): resolve the config first or pass r")
    alpha = alpha or cfg.alpha or 2 * r
    use_dora = cfg.use_dora if use_dora is None else use_dora
    use_rslora = cfg.use_rslora if use_rslora is None else use_rslora
    dropout = cfg.dropout if dropout is None else dropout
    if targets is None:
        targets = resolve_targets(model, cfg.target_modules, include_experts=not use_dora)
    elif use_dora and targets.parameters:
        for p in targets.parameters:
            targets.skipped[p] = "fused experts (DoRA unsupported there)"
        targets = AdapterTargets(modules=targets.modules, parameters=[], skipped=targets.skipped)
    peft_cfg = PeftLoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets.modules) or None,
        target_parameters=list(targets.parameters) or None, use_dora=use_dora, use_rslora=use_rslora,
        modules_to_save=modules_to_save or None, bias="none", task_type="CAUSAL_LM",
    )
    with exact_targets():
        pm = get_peft_model(model, peft_cfg)
    if dropout > 0:
        for mod in pm.modules():
            drops = getattr(mod, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict) and isinstance(getattr(mod, "base_layer", None), nn.Linear):
                for key in list(drops.keys()):
                    drops[key] = nn.Dropout(p=dropout)
    if use_dora:
        from dsft.model.fp8_linear import has_fp8

        if has_fp8(pm):  # DoRA + dropout would keep a dequantized copy of every FP8 weight for backward
            from dsft.model.fp8_dora import use_fp8_dora

            use_fp8_dora(pm)
    return pm, targets


def adapted_module_names(peft_model) -> list[str]:
    """Names (relative to the base model) of the modules/parameters that carry a LoRA adapter."""
    names = []
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and len(getattr(mod, "lora_A", {})) and not name.endswith(".base_layer"):
            names.append(name.removeprefix("base_model.model."))
    return names


def save_adapter(peft_model, out_dir: str | Path, *, state_dict: dict | None = None) -> None:
    """Save a LoRA adapter (safetensors) with its exact target names (PEFT's MoE rewrite off, as when attached)."""
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    with exact_targets():
        peft_model.save_pretrained(str(out_dir), safe_serialization=True, **kw)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a folder holding a PEFT adapter (adapter_config.json) rather than a model (no config.json)."""
    p = Path(path).expanduser()
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def check_adapter_dir(adapter_dir: str | Path, *, name: str | None = None) -> Path:
    """The folder, checked to be a PEFT adapter in safetensors; one-line ModelError otherwise (`name`: serving's label)."""
    adapter_dir = Path(adapter_dir)
    what = f"LoRA adapter '{name}': {adapter_dir}" if name else str(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelError(f"LoRA adapter '{name}': folder {adapter_dir} not found" if name
                         else f"adapter folder {adapter_dir} not found")
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{what}: no adapter_config.json — expected a LoRA adapter folder (PEFT, e.g. from `dsft train`)")
    if not (adapter_dir / "adapter_model.safetensors").exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise ModelError(f"{what}: only adapter_model.bin (pickle) found; dsft loads safetensors only")
        raise ModelError(f"{what}: no adapter_model.safetensors (dsft reads safetensors only)")
    return adapter_dir


def adapter_type(adapter_dir: str | Path) -> str:
    """'lora', 'dora', … of an adapter folder (its adapter_config.json)."""
    cfg = read_adapter_config(adapter_dir)
    return "dora" if cfg.get("use_dora") else str(cfg.get("peft_type", "LORA")).lower()


def load_adapter(base_model, adapter_dir: str | Path, *, is_trainable: bool = False):
    """Load a dsft/PEFT adapter folder (safetensors) onto `base_model` exactly on the modules it was trained on."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    try:
        with exact_targets():
            return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    except Exception as err:
        raise ModelError(f"{adapter_dir}: cannot load the adapter ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def load_named_adapters(base_model, adapters: dict[str, str | Path]):
    """Load several adapter folders onto one base, each under its name (serving: chosen per request)."""
    items = [(name, check_adapter_dir(path, name=name)) for name, path in adapters.items()]
    if not items:
        return base_model
    from peft import PeftModel

    try:
        with exact_targets():
            model = PeftModel.from_pretrained(base_model, str(items[0][1]), adapter_name=items[0][0])
            for name, path in items[1:]:
                model.load_adapter(str(path), adapter_name=name)
    except Exception as err:
        raise ModelError(f"cannot load LoRA adapters ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    return model


def merge_adapter(peft_model):
    """Merge LoRA into the base weights and return the plain transformers model (assign the result)."""
    from dsft.model.fp8_linear import has_fp8

    if has_fp8(peft_model):  # PEFT would add the delta to a dequantized temporary: a silent no-op
        raise ModelError("cannot merge an adapter into an FP8 base in memory: merge with `dsft export` (FP8 streaming merge)")
    return peft_model.merge_and_unload()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter folder's adapter_config.json as a dict."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))


def lora_rank(adapter_dir: str | Path) -> int | None:
    """The LoRA rank `r` an adapter folder was saved with (None when its adapter_config.json is unreadable)."""
    try:
        return int(read_adapter_config(adapter_dir).get("r"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
