"""Preference objectives on pairs: DPO (sigmoid loss against the reference), ORPO (NLL + odds ratio, no reference)
and SimPO (length-normalised reward with a margin, no reference).

A step takes its pairs from the step plan like SFT takes samples; each micro-batch packs the chosen and rejected
sequences of its pairs (position ids restart per sequence, so nothing attends across them), sums each sequence's
answer log-probs, and returns Σ pair losses; the loop divides by the step's pair count, so the gradient does not
depend on how the step is split (the OOM ladder stays exact). The reference is the base with adapters disabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsft.train.batching import collate_packed, collate_padded, split_micro
from dsft.train.objectives.common import LogProbLoss, Reference, disable_dropout, mean_stat, per_sample_sum
from dsft.train.objectives.encode import PairExample, encode_pairs
from dsft.train.step import to_device

ADAPTERS = ("lora", "dora", "qlora")


def preference_losses(kind: str, pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
                      rc: torch.Tensor | None = None, rr: torch.Tensor | None = None, *, beta: float = 0.1,
                      label_smoothing: float = 0.0, gamma: float = 0.5, lam: float = 0.1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, reward of chosen, reward of rejected) from summed answer log-probs of policy (pc, pr),
    answer token counts (nc, nr) and, for DPO, the reference's summed log-probs (rc, rr)."""
    if kind == "dpo":
        rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
        z = rew_c - rew_r
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return loss, rew_c.detach(), rew_r.detach()
    avg_c, avg_r = pc / nc, pr / nr
    if kind == "simpo":
        loss = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
        return loss, (beta * avg_c).detach(), (beta * avg_r).detach()
    if kind == "orpo":
        # log odds(y) = log p − log(1 − p) with p the mean-token probability; log(1 − e^x) = log(−expm1(x))
        log_odds = (avg_c - avg_r) - (torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r)))
        loss = -avg_c - lam * F.logsigmoid(log_odds)
        return loss, (lam * avg_c).detach(), (lam * avg_r).detach()
    raise ValueError(f"unknown preference objective {kind!r}")


@dataclass
class StepPair:
    """A pair inside one optimizer step (`key` = its position in the step, for per-pair statistics)."""

    key: int
    pair: PairExample

    @property
    def n_labels(self) -> int:
        return self.pair.n_labels


class PreferenceLoss(LogProbLoss):
    """forward(batch of pairs) → Σ pair losses; records each pair's rewards in `stats`."""

    def __init__(self, model, kind: str, dcfg, *, reference: Reference | None, chunk_size: int = 4096):
        super().__init__(model, chunk_size)
        self.kind, self.dcfg = kind, dcfg
        self.reference = [reference]  # a list: never a registered submodule (no DDP sync, no checkpoint)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = 2 * batch["unit"].numel()
        logps, sample = self.token_logps(batch)
        sums = per_sample_sum(logps, sample, n)
        counts = per_sample_sum(torch.ones_like(logps), sample, n).clamp(min=1)
        ref_c = ref_r = None
        if self.kind == "dpo":
            with torch.no_grad(), self.reference[0].active() as ref_model:
                ref_logps, ref_sample = self.token_logps(batch, model=ref_model)
            ref = per_sample_sum(ref_logps, ref_sample, n)
            ref_c, ref_r = ref[0::2], ref[1::2]
        d = self.dcfg
        loss, rew_c, rew_r = preference_losses(self.kind, sums[0::2], sums[1::2], counts[0::2], counts[1::2],
                                               ref_c, ref_r, beta=d.beta, label_smoothing=d.label_smoothing,
                                               gamma=d.simpo_gamma, lam=d.orpo_lambda)
        for k, key in enumerate(batch["unit"].tolist()):
            c, r = float(rew_c[k]), float(rew_r[k])
            self.stats[str(key)] = {"loss": float(loss[k].detach()), "chosen": c, "rejected": r, "margin": c - r,
                                    "accuracy": float(c > r), "logp_chosen": float(sums[2 * k].detach())}
        return loss.sum()


def collate_pairs(chunk: list[StepPair], *, packing: bool, capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of the pairs, interleaved (sample 2k = chosen of pair k, 2k+1 = rejected)."""
    seqs = [e for u in chunk for e in (u.pair.chosen, u.pair.rejected)]
    batch = collate_packed(seqs, capacity, pad_id) if packing else collate_padded(seqs, pad_id)
    batch["unit"] = torch.tensor([u.key for u in chunk], dtype=torch.long)
    return batch


class PreferenceObjective:
    """dpo / orpo / simpo plugged into the SFT loop (see dsft.train.objectives.Objective)."""

    units_per_example = 1

    def __init__(self, cfg):
        self.cfg = cfg
        self.kind = cfg.train.objective
        self.loss: PreferenceLoss | None = None

    # -- data
    def encode(self, tok, records: list[dict], max_len: int, *, source: str):
        return encode_pairs(tok, records, max_len, max_prompt=self.cfg.dpo.max_prompt_length, source=source)

    # -- model
    def build_loss(self, model, r) -> PreferenceLoss:
        disable_dropout(model)
        ref = Reference(model, adapters=r.tc.method in ADAPTERS) if self.kind == "dpo" else None
        self.loss = PreferenceLoss(model, self.kind, self.cfg.dpo, reference=ref, chunk_size=r.tc.loss_chunk_size)
        return self.loss

    collate = staticmethod(collate_pairs)

    # -- one step
    def prepare_step(self, r, s, step: int, exs: list[PairExample]) -> tuple[list[StepPair], int]:
        self.loss.stats.clear()
        return [StepPair(k, p) for k, p in enumerate(exs)], len(exs)

    def step_metrics(self, step: int) -> dict[str, Any]:
        st = self.loss.stats
        return {f"{self.kind}/{k}": round(v, 6) for k in ("chosen", "rejected", "margin", "accuracy")
                if (v := mean_stat(st, k)) is not None}

    def evaluate(self, r, s) -> dict[str, float]:
        m = pair_metrics(s.loss_mod, self.loss, r.eval_examples, micro=s.ladder.micro_batch, packing=r.tc.packing,
                         capacity=r.capacity, pad_id=r.pad_id, device=r.device)
        s.model.train()
        return {"eval_loss": m["loss"], "eval_margin": m["margin"], "eval_accuracy": m["accuracy"]}

    # -- checkpoint, manifest, plots
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        pass

    def manifest(self, history: list[dict]) -> dict[str, Any]:
        recs = [h for h in history if f"{self.kind}/margin" in h.get("objective", {})]
        last = recs[-1]["objective"] if recs else {}
        ref = None
        if self.kind == "dpo":
            ref = "base, adapters disabled" if self.cfg.train.method in ADAPTERS else "frozen copy of the base"
        return {"objective": self.kind, "objective_config": self.cfg.dpo.model_dump(mode="json"), "reference": ref,
                "margin_last": last.get(f"{self.kind}/margin"), "accuracy_last": last.get(f"{self.kind}/accuracy"),
                "plot": "preference.png"}

    def plot(self, history: list[dict], stage_dir: Path) -> None:
        from dsft.train.objectives.plots import plot_series

        keys = [f"{self.kind}/{k}" for k in ("chosen", "rejected", "margin")]
        plot_series(history, keys, stage_dir / "preference.png", title=f"{self.kind}: implicit rewards")


@torch.no_grad()
def pair_metrics(loss_mod, raw: PreferenceLoss, pairs: list[PairExample], *, micro: int, packing: bool,
                 capacity: int, pad_id: int, device) -> dict[str, float]:
    """Mean loss, reward margin and accuracy (chosen reward > rejected) over pairs, in eval mode."""
    raw.model.eval()
    saved, raw.stats = raw.stats, {}
    try:
        units = [StepPair(k, p) for k, p in enumerate(pairs)]
        for chunk in split_micro(units, max(1, micro)):
            loss_mod(to_device(collate_pairs(chunk, packing=packing, capacity=capacity, pad_id=pad_id), device))
        st = raw.stats
    finally:
        raw.stats = saved
    return {k: mean_stat(st, k) if st else math.nan for k in ("loss", "margin", "accuracy", "chosen", "rejected")}
