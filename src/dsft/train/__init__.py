"""Stage 'train' of dsft: LoRA/DoRA/QLoRA/full/freeze fine-tuning with packing, checkpoints and resume."""

from __future__ import annotations

from typing import Any


def train(cfg, run, resume: str | None = None, force: bool = False, **kwargs: Any) -> dict:
    """Train on the data stage's train.jsonl; write adapter/ (or model/) and the train manifest (see ARCHITECTURE.md)."""
    from dsft.train.trainer import train as _train

    return _train(cfg, run, resume=resume, force=force, **kwargs)


__all__ = ["train"]
