"""Causal-LM loss computed only where labels exist: decoder → hidden states → LM head on labelled positions → CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsft.train.encode import IGNORE


def unwrap(model):
    """The transformers *ForCausalLM under DDP/FSDP and PEFT wrappers."""
    m = model
    while hasattr(m, "module") and isinstance(m.module, nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


class CausalLMLoss(nn.Module):
    """forward(batch) → summed token cross-entropy; wrap this (not the LM) in DDP so gradients sync.

    Logits are computed only for positions that have a target (assistant tokens), in chunks, and the
    cross-entropy in fp32: the LM head over a 100 k+ vocabulary dominates small/medium models otherwise.
    """

    def __init__(self, model, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap(self.model)
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        # use_cache=False matters: with a cache, transformers skips packed-sequence detection (NOTES.md)
        return inner.get_decoder()(**kwargs).last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.hidden(batch)
        sel = batch["targets"] != IGNORE
        hs, tg = h[sel], batch["targets"][sel]
        head = unwrap(self.model).get_output_embeddings()
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, tg.numel(), self.chunk_size):
            logits = head(hs[i:i + self.chunk_size]).float()
            total = total + F.cross_entropy(logits, tg[i:i + self.chunk_size], reduction="sum")
        return total


@torch.no_grad()
def per_sample_losses(loss_module: CausalLMLoss, batch: dict[str, torch.Tensor]) -> dict[int, float]:
    """Mean token CE of each sample in a (packed or padded) batch, keyed by the batch-local sample index."""
    h = loss_module.hidden(batch)
    head = unwrap(loss_module.model).get_output_embeddings()
    sel = batch["targets"] != IGNORE
    logits = head(h[sel]).float()
    ce = F.cross_entropy(logits, batch["targets"][sel], reduction="none")
    ids = batch["sample_index"][sel]
    out: dict[int, float] = {}
    for s in ids.unique().tolist():
        out[int(s)] = float(ce[ids == s].double().mean())
    return out
