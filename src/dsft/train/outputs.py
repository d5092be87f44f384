"""What a finished run leaves behind: adapter/ or model/ (+ tokenizer), loss.png, and the train manifest."""

from __future__ import annotations

from typing import Any

from dsft.model.base_checkpoint import read_base_checkpoint
from dsft.train.loop import LoopResult
from dsft.train.loss import unwrap
from dsft.train.recipe import Recipe
from dsft.train.state import TrainState, gathered_model_state


def save_trained(r: Recipe, s: TrainState) -> tuple[str | None, str | None]:
    """Write adapter/ (LoRA methods) or model/ (full, freeze) with the tokenizer; returns (adapter, model) folders.
    Under FSDP/DeepSpeed every rank takes part in gathering the weights; the main rank writes."""
    from dsft.model.adapters import save_adapter

    dist = r.dist
    inner = unwrap(s.model)
    if r.prev_attn is not None:
        inner.set_attn_implementation(r.prev_attn)
    full_sd = gathered_model_state(dist, s.loss_mod) if dist.kind in ("FSDP", "DEEPSPEED") else None
    if r.tc.method in ("lora", "dora", "qlora"):
        if dist.is_main:
            save_adapter(s.model, r.stage_dir / "adapter", state_dict=full_sd)
            r.tok.save_pretrained(str(r.stage_dir / "adapter"))
        return "adapter", None
    if dist.is_main:
        kw = {"state_dict": full_sd} if full_sd is not None else {}
        inner.save_pretrained(str(r.stage_dir / "model"), safe_serialization=True, **kw)
        r.tok.save_pretrained(str(r.stage_dir / "model"))
    return None, "model"


def manifest(r: Recipe, s: TrainState, res: LoopResult, adapter: str | None, model: str | None) -> dict[str, Any]:
    """The train manifest (docs/ARCHITECTURE.md lists the keys the next stages read)."""
    tc, info, enc = r.tc, r.info, r.enc_rep
    losses = s.monitor.losses()
    window = max(1, min(tc.logging_steps, len(losses)))
    m = {
        "base_model": str(r.model_dir), "method": tc.method, "adapter": adapter, "model": model,
        "steps": res.steps_done, "total_steps": r.total_steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "loss_last_step": losses[-1] if losses else None,
        "log": "log.jsonl", "loss_png": "loss.png",
        "tb": "tb" if "tensorboard" in tc.report_to and not tc.logging_dir else tc.logging_dir,
        "tokens_per_s": round(res.tokens_seen / res.seconds, 1) if res.seconds > 0 and res.tokens_seen else None,
        "train_seconds": round(s.train_seconds + res.seconds, 2),
        "loop_seconds": round(res.seconds, 3), "loop_cpu_seconds": round(res.cpu_seconds, 3),
        "trainable_params": info["trainable_params"], "total_params": info["total_params"],
        "learning_rate": r.hp.learning_rate, "epochs": r.hp.epochs, "micro_batch": s.ladder.micro_batch,
        "effective_batch": r.effective, "preset": r.hp.preset, "precision": r.precision, "packing": tc.packing,
        "early_stopped": res.stopped_early,
        "encode": {"total": enc.total, "kept": enc.kept, "dropped": enc.dropped, "truncated": enc.truncated,
                   "tokens": enc.tokens, "label_tokens": enc.assistant_tokens},
        "dataset_fingerprint": r.fingerprint,
        "method_info": {k: v for k, v in info.items() if k not in ("trainable_params", "total_params")},
        "processes": _processes(r.dist),
        "base_checkpoint": read_base_checkpoint(r.model_dir),  # format, shards, MTP layers kept aside (for export)
    }
    if s.scaler is not None:
        m["grad_scaler"] = {"scale": float(s.scaler.get_scale())}
    return m


def _processes(dist) -> dict[str, Any]:
    p: dict[str, Any] = {"world": dist.world, "kind": dist.kind}
    if dist.cpu_fsdp:
        p["local_param_fraction"] = dist.local_param_fraction
    if dist.engine is not None:
        p.update(zero_stage=dist.zero_stage, local_optim_fraction=dist.local_optim_fraction)
        if dist.zero_stage == 3:
            p["local_param_fraction"] = dist.local_param_fraction
    return p
