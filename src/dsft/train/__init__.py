"""Stage 'train' of dsft: LoRA/DoRA/QLoRA/full/freeze fine-tuning with packing, checkpoints and resume."""

from dsft.train.stage import run

train = run  # the name pipeline.py and earlier callers use

__all__ = ["run", "train"]
