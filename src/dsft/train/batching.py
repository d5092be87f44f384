"""Which samples each optimizer step sees (deterministic by seed and step), and packed / padded collation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsft.train.encode import IGNORE, Encoded


@dataclass(frozen=True)
class StepPlan:
    """Epoch-wise shuffled order cut into effective batches; step k ↦ the same samples on every run."""

    n: int
    effective_batch: int
    seed: int
    group_by_length: bool = False
    lengths: tuple[int, ...] = ()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.effective_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.group_by_length and self.lengths:
            # length-grouped batching (packing off): sort within mega-batches of 16 effective batches,
            # then shuffle the batches, so padding is small and the order stays random
            mega = 16 * self.effective_batch
            grouped: list[list[int]] = []
            for s in range(0, self.n, mega):
                chunk = sorted(order[s:s + mega], key=lambda i: -self.lengths[i])
                grouped += [chunk[j:j + self.effective_batch] for j in range(0, len(chunk), self.effective_batch)]
            perm = torch.randperm(len(grouped), generator=g).tolist()
            order = [i for b in perm for i in grouped[b]]
        return order

    def samples(self, step: int) -> list[int]:
        """Sample indices of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[k * self.effective_batch:(k + 1) * self.effective_batch]


def split_micro(indices: Sequence[int], micro: int) -> list[list[int]]:
    return [list(indices[i:i + micro]) for i in range(0, len(indices), micro)]


def _targets(ex: Encoded) -> list[int]:
    """Labels shifted left inside one sample: position t predicts token t+1; the sample's last position predicts nothing."""
    return ex.labels[1:] + [IGNORE]


def collate_packed(examples: Sequence[Encoded], capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack samples into rows of ≤ capacity tokens (first-fit decreasing); position ids restart per sample.

    With `attention_mask=None` and restarting position ids, transformers builds a block-diagonal causal mask
    (sdpa/eager) or uses varlen flash-attention, so no sample attends to another. Padding at a row's end
    is its own block (positions restart at 0) and has no targets.
    """
    capacity = max(capacity, max(len(e.input_ids) for e in examples))
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        L = len(examples[i].input_ids)
        for r, free in enumerate(room):
            if free >= L:
                rows[r].append(i)
                room[r] -= L
                break
        else:
            rows.append([i])
            room.append(capacity - L)
    width = max(capacity - f for f in room)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    tgt = torch.full((B, width), IGNORE, dtype=torch.long)
    sample = torch.full((B, width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        c = 0
        for i in members:
            ex = examples[i]
            L = len(ex.input_ids)
            ids[r, c:c + L] = torch.tensor(ex.input_ids)
            pos[r, c:c + L] = torch.arange(L)
            tgt[r, c:c + L] = torch.tensor(_targets(ex))
            sample[r, c:c + L] = i
            c += L
        if c < width:
            pos[r, c:] = torch.arange(width - c)
    return {"input_ids": ids, "position_ids": pos, "targets": tgt, "sample_index": sample}


def collate_padded(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded, with a 2-D attention mask (packing off)."""
    width = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    tgt = torch.full((B, width), IGNORE, dtype=torch.long)
    sample = torch.full((B, width), -1, dtype=torch.long)
    for r, ex in enumerate(examples):
        L = len(ex.input_ids)
        ids[r, :L] = torch.tensor(ex.input_ids)
        mask[r, :L] = 1
        tgt[r, :L] = torch.tensor(_targets(ex))
        sample[r, :L] = r
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": tgt, "sample_index": sample}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["sample_index"] >= 0).sum())
