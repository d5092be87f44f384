"""Merge a LoRA/DoRA adapter into a 16/32-bit base, save a plain-transformers folder, check the logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsft.errors import ExportError
from dsft.model.probes import PROBE_CONVERSATIONS
from dsft.run import atomic_dir

log = logging.getLogger(__name__)

# |merged − unmerged| must stay below TOL_REL · max|logit| + TOL_ABS for the fp32 merge itself.
MERGE_TOL_REL = 1e-4
MERGE_TOL_ABS = 1e-4
# Expected relative error of a saved dtype (its epsilon-ish scale); reported, warned when exceeded.
DTYPE_TOL_REL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def probe_batches(tok, conversations: list[list[dict[str, str]]], max_len: int = 128) -> list[Any]:
    """Token-id tensors (1, T) of the probe conversations rendered with the chat template."""
    import torch

    out = []
    for msgs in conversations:
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_len]
        if ids:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise ExportError("no probe conversation could be tokenized for the merge check")
    return out


def logits_of(model, batches: list[Any]) -> list[Any]:
    """fp32 logits of each probe (no cache, eval mode)."""
    import torch

    model.eval()
    dev = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for ids in batches:
            outs.append(model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu())
    return outs


FP16_MAX = 65504.0


def activation_peak(model, batches: list[Any]) -> tuple[float, str]:
    """Largest |activation| any module outputs on the probes, and where (for the fp16 overflow check)."""
    import torch

    peak = {"v": 0.0, "where": ""}

    def visit(name):
        def hook(_mod, _inp, out):
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    v = float(t.detach().abs().max())
                    if not v < float("inf") or v > peak["v"]:
                        peak["v"], peak["where"] = v, name
        return hook

    handles = [m.register_forward_hook(visit(n)) for n, m in model.named_modules() if n]
    try:
        logits_of(model, batches)
    finally:
        for h in handles:
            h.remove()
    return peak["v"], peak["where"]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def max_abs(a: list[Any]) -> float:
    return max(float(x.abs().max()) for x in a)


def _generation_config(model, tok):
    from transformers import GenerationConfig

    gc = getattr(model, "generation_config", None)
    if gc is None:
        gc = GenerationConfig()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gc, key, None) is None and getattr(tok, key, None) is not None:
            setattr(gc, key, getattr(tok, key))
    return gc


def fp16_check(model, batches: list[Any], hint: str = "export.dtype: bfloat16 (fp32 range) or float32") -> dict[str, Any]:
    """The largest activation on the probes; one-line ExportError when float16 cannot hold it."""
    peak, where = activation_peak(model, batches)
    if not peak < FP16_MAX:
        raise ExportError(f"float16 export: activation {peak:.4g} at '{where}' exceeds the fp16 maximum {FP16_MAX:g} "
                          f"on the eval set; use {hint}")
    return {"fp16_max_activation": peak, "fp16_max_activation_at": where}


def save_half(merged_dir: Path, dest: Path, dtype: str, *, tok, conversations=None) -> dict[str, Any]:
    """The merged folder re-saved in float16/bfloat16 (fp16: refused when an activation on the probes overflows)."""
    from dsft.model.load import load_model

    model = load_model(merged_dir, dtype="float32", attn_implementation="eager")
    info = fp16_check(model, probe_batches(tok, conversations or PROBE_CONVERSATIONS), "the bf16 format (fp32 range)") \
        if dtype == "float16" else {}
    save_plain(model, tok, dest, dtype)
    return info


def save_plain(model, tok, out_dir: Path, dtype: str) -> Path:
    """Save model (cast to dtype) + tokenizer + chat template + generation_config atomically to out_dir."""
    from dsft.model.load import torch_dtype

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model = model.to(torch_dtype(dtype))
        model.config.use_cache = True
        model.generation_config = _generation_config(model, tok)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if not any(tmp.glob("*.safetensors")):
            raise ExportError(f"{out_dir}: transformers wrote no safetensors file")
    return out_dir


def merge_and_save(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    tok,
    adapter_dir: str | Path | None = None,
    dtype: str = "float32",
    conversations: list[list[dict[str, str]]] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load base (fp32) [+ adapter], merge, save in `dtype`, reload from disk, compare logits.

    Returns {merged, dtype, max_abs_diff, max_abs_diff_fp32_merge, logit_scale, tolerance, within_tolerance,
    adapter_type, params}. Raises ExportError when the fp32 merge itself changes the outputs.
    """
    from dsft.model.load import load_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    batches = probe_batches(tok, conversations or PROBE_CONVERSATIONS)
    # Always merge into a full-precision base (never into a quantized one): reload it in fp32.
    base = load_model(base_dir, dtype="float32", trust_remote_code=trust_remote_code, attn_implementation="eager")
    adapter_type = None
    if adapter_dir is not None:
        from dsft.model.adapters import adapter_type as read_adapter_type
        from dsft.model.adapters import load_adapter

        peft_model = load_adapter(base, adapter_dir)
        adapter_type = read_adapter_type(adapter_dir)
        ref = logits_of(peft_model, batches)
        merged = peft_model.merge_and_unload()  # returns a new model: assign it
    else:
        merged = base
        ref = logits_of(merged, batches)
    in_memory = logits_of(merged, batches)
    scale = max_abs(ref)
    merge_diff = max_abs_diff(ref, in_memory)
    merge_tol = MERGE_TOL_REL * max(scale, 1.0) + MERGE_TOL_ABS
    if merge_diff > merge_tol:
        raise ExportError(f"{adapter_dir}: merged model differs from base+adapter by {merge_diff:.3g} "
                          f"(> {merge_tol:.3g}) in fp32 logits; the adapter cannot be merged faithfully")
    n_params = sum(p.numel() for p in merged.parameters())
    fp16 = fp16_check(merged, batches) if dtype == "float16" else {}
    save_plain(merged, tok, out_dir, dtype)
    del merged, base
    reloaded = load_model(out_dir, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="eager")
    got = logits_of(reloaded, batches)
    if not all(bool(x.isfinite().all()) for x in got):
        raise ExportError(f"{out_dir}: the saved {dtype} model produces inf/nan logits on the eval set; "
                          f"use export.dtype: bfloat16 or float32")
    diff = max_abs_diff(ref, got)
    tol = DTYPE_TOL_REL[dtype] * max(scale, 1.0) + MERGE_TOL_ABS
    if diff > tol:
        log.warning("export: saved %s model differs from base+adapter by %.3g (> %.3g expected for %s)",
                    dtype, diff, tol, dtype)
    return {
        "merged": str(out_dir), "dtype": dtype, "max_abs_diff": diff, "max_abs_diff_fp32_merge": merge_diff,
        "logit_scale": scale, "tolerance": tol, "within_tolerance": diff <= tol, "adapter_type": adapter_type,
        "params": n_params, "probe_sequences": len(batches), **fp16,
    }
