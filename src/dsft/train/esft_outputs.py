"""What an ESFT run leaves behind: `train/esft/` (the expert delta + its json) and `train/model/` (base + delta merged).

The delta holds the trained experts (and any shared-expert / non-expert tensors trained with them) named as in
DeepSeek's checkpoints; `dsft.model.esft_delta` reads, checks, applies and merges it. `model/` keeps the later
stages (eval, export, serve) working unchanged: it is just weights.
"""

from __future__ import annotations

from typing import Any

from dsft.train.esft import TRAINED_DOWN, TRAINED_GATE_UP, merge_back, trained_rows
from dsft.train.loss import unwrap

DELTA_DIR = "esft"


def delta_tensors(model) -> dict[str, Any]:
    """The checkpoint-named tensors ESFT trained: split-out experts + other trainable parameters."""
    from dsft.model.esft_delta import expert_tensors

    out = expert_tensors(trained_rows(model))
    for n, p in model.named_parameters():
        if p.requires_grad and not n.endswith((TRAINED_GATE_UP, TRAINED_DOWN)):
            out[n] = p.detach().cpu().contiguous()
    return out


def delta_meta(info: dict[str, Any], steps: int) -> dict[str, Any]:
    keys = ("experts", "selected_experts", "routed_experts", "score", "top_p", "selected_by", "profile_tokens",
            "train_shared_experts", "train_non_expert_modules", "trainable_params")
    return {**{k: info[k] for k in keys if k in info}, "steps": steps}


def save_esft(r, s) -> tuple[None, str]:
    """Write esft/ (delta) and model/ (merged, + tokenizer) on the main rank; returns (adapter, model) folders."""
    from dsft.model.esft_delta import write_delta

    inner = unwrap(s.model)
    tensors = delta_tensors(inner)
    merge_back(inner)
    if r.dist.is_main:
        write_delta(r.stage_dir / DELTA_DIR, tensors, delta_meta(r.info, s.step), base_dir=r.model_dir)
        inner.save_pretrained(str(r.stage_dir / "model"), safe_serialization=True)
        r.tok.save_pretrained(str(r.stage_dir / "model"))
    return None, "model"
