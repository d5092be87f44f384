"""What the preference and RL objectives share: per-token log-probs of packed rows, the reference model (the base
with adapters disabled for LoRA, a frozen copy for full/freeze), dropout off, and per-unit step statistics."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsft.train.encode import IGNORE
from dsft.train.loss import CausalLMLoss, unwrap


def disable_dropout(model) -> int:
    """Set every dropout probability to 0 (the policy's log-probs must match the reference's and the sampler's,
    as TRL's disable_dropout); returns how many modules changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p:
            m.p = 0.0
            n += 1
    for cfg in (getattr(unwrap(model), "config", None),):
        for key in ("attention_dropout", "hidden_dropout"):
            if cfg is not None and getattr(cfg, key, 0):
                setattr(cfg, key, 0.0)
    return n


class Reference:
    """The frozen reference policy: with adapters, the same model with adapters disabled (no second copy);
    otherwise a frozen copy of the base taken before training."""

    def __init__(self, model, *, adapters: bool):
        self.model = model
        self.copy = None
        if not adapters:
            self.copy = copy.deepcopy(unwrap(model)).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module | None]:
        """Within this block the returned module (None: the loss module's own model) computes reference log-probs."""
        if self.copy is not None:
            yield self.copy
            return
        with self.model.disable_adapter():
            yield None


class LogProbLoss(CausalLMLoss):
    """A loss module that needs log-probs of target tokens per sample (not only their sum over the batch)."""

    def __init__(self, model, chunk_size: int = 4096):
        super().__init__(model, chunk_size)
        self.stats: dict[str, dict[str, float]] = {}
        """Per-unit statistics of the current step, keyed by unit id (an OOM retry overwrites, never doubles)."""

    def token_logps(self, batch: dict[str, torch.Tensor], *, model=None, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of every target token, its batch-local sample index), in fp32; `model` overrides the policy."""
        if model is None:
            h = self.hidden(batch)
            head = unwrap(self.model).get_output_embeddings()
        else:
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = batch["attention_mask"]
            h = model.get_decoder()(**kwargs).last_hidden_state
            head = model.get_output_embeddings()
        sel = batch["targets"] != IGNORE
        hs, tg = h[sel], batch["targets"][sel]
        parts = []
        for i in range(0, tg.numel(), self.chunk_size):
            logits = head(hs[i:i + self.chunk_size]).float()
            if temperature != 1.0:
                logits = logits / temperature
            parts.append(-F.cross_entropy(logits, tg[i:i + self.chunk_size], reduction="none"))
        logps = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        return logps, batch["sample_index"][sel]


def per_sample_sum(values: torch.Tensor, sample: torch.Tensor, n: int) -> torch.Tensor:
    """Σ of values per sample index 0..n-1 (differentiable)."""
    return values.new_zeros(n).index_add(0, sample, values)


def mean_stat(stats: dict[str, dict[str, float]], key: str) -> float | None:
    vals = [s[key] for s in stats.values() if key in s]
    return sum(vals) / len(vals) if vals else None
