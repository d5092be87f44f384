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
    """Write esft/ (delta) and model/ (merged, + tokenizer) on the main rank; returns (adapter, model) folders.
    Under FSDP / DeepSpeed every rank takes part in gathering the weights (`sharded_model`)."""
    from dsft.model.esft_delta import write_delta

    inner = unwrap(s.model)
    if r.dist.kind in ("FSDP", "DEEPSPEED"):
        inner = sharded_model(r, s)
    if inner is None:
        return None, "model"
    tensors = delta_tensors(inner)
    merge_back(inner)
    if r.dist.is_main:
        write_delta(r.stage_dir / DELTA_DIR, tensors, delta_meta(r.info, s.step), base_dir=r.model_dir)
        inner.save_pretrained(str(r.stage_dir / "model"), safe_serialization=True)
        r.tok.save_pretrained(str(r.stage_dir / "model"))
    return None, "model"


def sharded_model(r, s):
    """The trained ESFT model rebuilt on the main rank from the ranks' shards (None on the others): the gathered full
    state dict (a collective) loaded into the base split out the same way, on the CPU, so the delta and the merged
    model come from whole tensors. Costs one more copy of the model in the main rank's host memory."""
    from dsft.train.esft import Selection, apply_esft
    from dsft.train.setup import keep_router_fp32
    from dsft.train.state import gathered_model_state

    full = gathered_model_state(r.dist, s.loss_mod)
    if not r.dist.is_main:
        return None
    from dsft.model.load import load_model

    cfg = r.cfg
    model = load_model(r.model_dir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    info = r.info
    keep_router_fp32(model)  # as apply_method does before the split
    apply_esft(model, Selection(experts={int(k): v for k, v in info["experts"].items()},
                                shared_experts=info["train_shared_experts"],
                                non_expert_modules=info["train_non_expert_modules"]))
    model.load_state_dict(full, strict=True)
    return model
