"""The policy's current weights as a base checkpoint would name them, LoRA merged on the fly (W + scale·B@A).

Used to push the training model into a rollout engine (GRPO on vLLM): the training model is never modified (no
in-place merge); LoRA layers contribute their merged weight, PEFT's `modules_to_save` copies replace the originals,
and transformers' in-memory layout (fused MoE experts …) is reverted to the checkpoint's (`revert_weight_conversion`,
what save_pretrained does) so the engine's checkpoint loader reads them.
"""

from __future__ import annotations

import torch

from dsft.train.loss import unwrap

LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def _base_model(model):
    """The transformers model under PEFT's wrapper (its LoRA layers still injected), or the model itself."""
    inner = unwrap(model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(inner, "peft_config") else inner


def _merged_lora(base) -> dict[str, torch.Tensor]:
    """'<module>.weight' → base weight + Σ active adapters' scale·B@A, for every PEFT LoRA layer."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: no LoRA layers either
        return {}
    out = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        w = mod.get_base_layer().weight.detach()
        merged = w.clone()
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A or adapter in getattr(mod, "lora_embedding_A", {}):
                merged += mod.get_delta_weight(adapter).to(w.dtype)
        out[f"{name}.weight"] = merged
    return out


def _checkpoint_name(key: str) -> str | None:
    """A PEFT-injected model's state-dict key → the plain model's, or None for keys that are not weights of it."""
    if any(p in key for p in LORA_PARTS) or ".original_module." in key:
        return None
    if ".modules_to_save." in key:  # '<m>.modules_to_save.<adapter>.<param>' → '<m>.<param>'
        head, _, tail = key.partition(".modules_to_save.")
        return f"{head}.{tail.partition('.')[2]}"
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def policy_state_dict(model) -> dict[str, torch.Tensor]:
    """name → tensor of the policy as its base checkpoint names it (LoRA merged, modules_to_save applied).

    Only the merged LoRA weights are new tensors; every other entry is the training parameter itself, detached."""
    base = _base_model(model)
    merged = _merged_lora(base)
    sd: dict[str, torch.Tensor] = {}
    for key, t in base.state_dict(keep_vars=True).items():
        name = _checkpoint_name(key)
        if name is not None:
            sd[name] = merged.get(name, t.detach()) if ".base_layer." in key else t.detach()
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(base, sd)
