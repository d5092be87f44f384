"""GRPO with verifiable rewards on the SFT loop: sample G completions per prompt, score them (dsft.rewards),
normalise rewards within each group, and take a clipped policy-gradient step with an optional KL to the base.

A step's prompts come from the step plan like SFT samples; `prepare_step` turns them into rollouts (prompt +
completion, labels on the completion, the group advantage and a token weight) which pack, collate and split into
micro-batches like SFT samples, so checkpoints, resume and the OOM ladder are the SFT loop's. One optimisation step
per generation (μ = 1, TRL's default): the importance ratio is 1 at the step, so clipping only bites when rollouts
are reused (not implemented) — the clip fraction is logged to show it. Guards stop the run with a reason and a fix
when completions are truncated, when no group has a reward spread for N steps, or when a reward function raises.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.errors import TrainError
from dsft.rewards import Reward, load_rewards, score
from dsft.train.batching import collate_packed, collate_padded
from dsft.train.encode import IGNORE, Encoded
from dsft.train.objectives.common import LogProbLoss, Reference, disable_dropout, mean_stat
from dsft.train.objectives.encode import PromptExample, encode_prompts
from dsft.train.objectives.rollout import generation_mode, sample_group, sample_groups, sampler_seed


@dataclass
class Rollout(Encoded):
    """A sampled completion as a training sample: its group advantage and per-token loss weight."""

    key: int = 0
    advantage: float = 0.0
    weight: float = 1.0


def group_advantages(rewards: list[float], group: int, *, scale: bool) -> list[float]:
    """(r − mean of its group) / (std of its group + 1e-4) (unbiased std, as TRL); scale=False: only centred."""
    out = []
    for g in range(0, len(rewards), group):
        rs = rewards[g:g + group]
        mu = sum(rs) / len(rs)
        sd = statistics.stdev(rs) if len(rs) > 1 else 0.0
        out += [(r - mu) / (sd + 1e-4) if scale else r - mu for r in rs]
    return out


def token_losses(logps: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, *, eps_low: float, eps_high: float,
                 beta: float = 0.0, ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped? mask, per-token KL) of the clipped surrogate −min(ρA, clip(ρ)A) + β·KL, with
    KL the k3 estimator exp(ref − logp) − (ref − logp) − 1."""
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    kl = torch.zeros_like(logps)
    if beta and ref is not None:
        d = ref - logps
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, is_clipped, kl.detach()


class GrpoLoss(LogProbLoss):
    """forward(batch of rollouts) → Σ weight × token loss; records each rollout's KL and clip share in `stats`."""

    def __init__(self, model, gcfg, *, reference: Reference | None, chunk_size: int = 4096):
        super().__init__(model, chunk_size)
        self.g = gcfg
        self.reference = [reference]  # a list: never a registered submodule

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.g
        logps, sample = self.token_logps(batch, temperature=g.temperature)
        ref = None
        if g.beta:
            with torch.inference_mode(), self.reference[0].active() as ref_model:
                ref, _ = self.token_logps(batch, model=ref_model, temperature=g.temperature)
            ref = ref.clone()  # a normal tensor again: autograd may not save inference-mode tensors
        adv, w = batch["advantage"][sample], batch["weight"][sample]
        # μ = 1: the sampling ("old") policy is the current one, so old log-probs are these, detached
        loss, clipped, kl = token_losses(logps, logps.detach(), adv, eps_low=g.epsilon,
                                         eps_high=g.epsilon_high or g.epsilon, beta=g.beta, ref=ref)
        self._record(batch["unit"].tolist(), sample, kl, clipped)
        return (loss * w).sum()

    def _record(self, units: list[int], sample: torch.Tensor, kl: torch.Tensor, clipped: torch.Tensor) -> None:
        """Each rollout's mean token KL and clipped share into `stats` (one pass over the batch, no per-unit loop)."""
        zeros = torch.zeros(len(units), dtype=torch.float64, device=kl.device)
        count = zeros.index_add(0, sample, torch.ones_like(kl, dtype=torch.float64)).clamp_(min=1)
        kls = (zeros.index_add(0, sample, kl.double()) / count).tolist()
        clips = (zeros.index_add(0, sample, clipped.double()) / count).tolist()
        for key, k, c in zip(units, kls, clips, strict=True):
            self.stats[str(key)] = {"kl": k, "clip": c}


def collate_rollouts(chunk: list[Rollout], *, packing: bool, capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate_packed(chunk, capacity, pad_id) if packing else collate_padded(chunk, pad_id)
    batch["advantage"] = torch.tensor([u.advantage for u in chunk], dtype=torch.float32)
    batch["weight"] = torch.tensor([u.weight for u in chunk], dtype=torch.float32)
    batch["unit"] = torch.tensor([u.key for u in chunk], dtype=torch.long)
    return batch


class GrpoObjective:
    """grpo plugged into the SFT loop (see dsft.train.objectives)."""

    collate = staticmethod(collate_rollouts)

    def __init__(self, cfg):
        self.cfg, self.g = cfg, cfg.grpo
        self.units_per_example = self.g.num_generations
        self.rewards: list[Reward] = load_rewards(self.g.rewards)
        self.loss: GrpoLoss | None = None
        self.zero_steps = 0
        self.last: dict[str, Any] = {}
        self.backend = "transformers"
        self.engine = None  # the vLLM rollout engine (grpo.rollout_backend), built at the first step's rollouts

    def encode(self, tok, records: list[dict], max_len: int, *, source: str):
        room = max_len - self.g.max_completion_length
        if room < 8:
            raise TrainError(f"data.max_seq_length {max_len} leaves {room} tokens for the prompt next to "
                             f"grpo.max_completion_length {self.g.max_completion_length}; raise data.max_seq_length")
        return encode_prompts(tok, records, room, source=source)

    def build_loss(self, model, r) -> GrpoLoss:
        from dsft.train.objectives.vllm_rollout import resolve_backend

        if self.g.rollout_backend != "transformers":  # refusals before any training
            self.backend = resolve_backend(self.cfg, r.device.type, r.dist.world, r.model_dir)
        disable_dropout(model)
        ref = Reference(model, adapters=r.tc.method in ("lora", "dora", "qlora")) if self.g.beta else None
        self.loss = GrpoLoss(model, self.g, reference=ref, chunk_size=r.tc.loss_chunk_size)
        return self.loss

    # -- one step: sample, score, guard, build rollouts
    def prepare_step(self, r, s, step: int, prompts: list[PromptExample]) -> tuple[list[Rollout], int]:
        g, G = self.g, self.g.num_generations
        self.loss.stats.clear()
        groups = self._sample(r, s, step, prompts)
        rewards, parts = self._score(prompts, groups)
        comps = [c for grp in groups for c in grp]
        self._guard_truncation(s, step, comps)
        adv = group_advantages(rewards, G, scale=g.scale_rewards)
        flat = [rewards[i:i + G] for i in range(0, len(rewards), G)]
        zero_groups = sum(1 for rs in flat if max(rs) == min(rs))
        self._guard_zero_advantage(step, zero_groups, len(flat))
        units = []
        for k, (c, a) in enumerate(zip(comps, adv, strict=True)):
            p = prompts[k // G]
            weight = 1.0 / len(c.ids) if g.loss_type == "grpo" else 1.0
            units.append(Rollout(p.input_ids + c.ids, [IGNORE] * len(p.input_ids) + c.ids, p.record_id,
                                 key=k, advantage=a, weight=weight))
        lens = [len(c.ids) for c in comps]
        self.last = {"grpo/reward": sum(rewards) / len(rewards),
                     "grpo/reward_std": sum(statistics.pstdev(rs) for rs in flat) / len(flat),
                     "grpo/completion_len": sum(lens) / len(lens),
                     "grpo/truncated": sum(c.truncated for c in comps) / len(comps),
                     "grpo/zero_adv_groups": zero_groups / len(flat),
                     **{f"grpo/rewards/{n}": v / len(comps) for n, v in parts.items()}}
        norm = {"dapo": sum(lens), "grpo": len(comps), "dr_grpo": len(comps) * g.max_completion_length}[g.loss_type]
        return units, norm

    def _sample(self, r, s, step: int, prompts: list[PromptExample]) -> list[list]:
        """G completions of every prompt, decoded a micro-batch of prompts at a time (its rollouts' KV cache is far
        smaller than their training activations, so a micro-batch that trains also generates).

        Under --nproc N rank k samples prompts k, k+N, … (a group never splits across ranks) from the seed of the
        prompt's slot in the step, so the step's rollouts are what one process samples; the groups are then gathered
        on every rank, which score them and compute the group advantages alike. Sharded ranks (FSDP, ZeRO-3) gather
        parameters in every forward, so they make the same number of decode calls and steps: a rank with fewer
        prompts decodes a dummy batch, and all keep stepping until every rank's rows have ended."""
        g, dist, per = self.g, r.dist, max(1, s.ladder.micro_batch)
        if self.backend == "vllm":
            return self._sample_vllm(r, s, step, prompts)
        mine = list(range(dist.rank, len(prompts), dist.world))
        chunks = [mine[i:i + per] for i in range(0, len(mine), per)]
        if dist.lockstep:
            most = math.ceil(math.ceil(len(prompts) / dist.world) / per)  # the busiest rank's decode calls
            chunks += [[]] * (most - len(chunks))
        all_ended = (lambda ended: not dist.any(not ended)) if dist.lockstep else None
        local: dict[int, list] = {}
        with generation_mode(s.model, r.prev_attn), dist.full_params(s.loss_mod):
            for chunk in chunks:
                ks = chunk or [0]  # empty: a dummy decode that keeps this rank in the collective forwards
                out = sample_groups(s.model, r.tok, [prompts[k].input_ids for k in ks], g.num_generations,
                                    max_new_tokens=g.max_completion_length,
                                    seeds=[sampler_seed(r.tc.seed, step, k) for k in ks], temperature=g.temperature,
                                    top_p=g.top_p, device=r.device, all_ended=all_ended)
                if chunk:
                    local.update(zip(chunk, out, strict=True))
        groups: dict[int, list] = {}
        for part in dist.gather_objects(local):
            groups.update(part)
        return [groups[k] for k in range(len(prompts))]

    def _sample_vllm(self, r, s, step: int, prompts: list[PromptExample]) -> list[list]:
        """G completions of every prompt from the colocated vLLM engine, after pushing the policy's weights into it
        (one process: --nproc > 1 was refused by resolve_backend)."""
        from dsft.train.objectives.vllm_rollout import VllmRollouts

        g = self.g
        if self.engine is None:
            self.engine = VllmRollouts(self.cfg, r.model_dir, r.tok)
        self.engine.sync(s.model)
        return self.engine.sample([p.input_ids for p in prompts], g.num_generations,
                                  max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                                  seeds=[sampler_seed(r.tc.seed, step, k) for k in range(len(prompts))])

    def close(self) -> None:
        """Stop the vLLM rollout engine (if one was built)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def _score(self, prompts: list[PromptExample], groups: list[list]) -> tuple[list[float], dict[str, float]]:
        rewards, parts = [], {}
        for p, grp in zip(prompts, groups, strict=True):
            for c in grp:
                total, each = score(self.rewards, c.text, p.record)
                rewards.append(total)
                for n, v in each.items():
                    parts[n] = parts.get(n, 0.0) + v
        return rewards, parts

    def _guard_truncation(self, s, step: int, comps: list) -> None:
        share = sum(c.truncated for c in comps) / len(comps)
        if share < self.g.max_truncated_ratio:
            return
        L = self.g.max_completion_length
        msg = (f"grpo: {share:.0%} of the completions at step {step + 1} hit grpo.max_completion_length {L} "
               f"without an end token (limit grpo.max_truncated_ratio {self.g.max_truncated_ratio:.0%}): their "
               f"rewards score cut-off text, so nothing useful is learned (trl#5697). Raise "
               f"grpo.max_completion_length (R1-style reasoning needs ≥ 1024; data.max_seq_length must hold prompt + "
               f"completion) or warm the model up with SFT on answers that end")
        if step < self.g.guard_warmup_steps:
            s.monitor.event(step + 1, "grpo_truncation", share=round(share, 4), max_completion_length=L)
            return
        s.monitor.event(step + 1, "grpo_truncation_stop", share=round(share, 4), max_completion_length=L)
        raise TrainError(msg)

    def _guard_zero_advantage(self, step: int, zero_groups: int, n_groups: int) -> None:
        self.zero_steps = self.zero_steps + 1 if zero_groups == n_groups else 0
        if self.zero_steps >= self.g.zero_advantage_steps:
            raise TrainError(f"grpo: every group's {self.g.num_generations} completions got the same reward for "
                             f"{self.zero_steps} steps in a row (up to step {step + 1}): the advantages are all 0 and "
                             f"nothing is learned. Check the reward functions against a few completions (answer "
                             f"format, `answer` field), raise grpo.temperature or grpo.num_generations, or start "
                             f"from a model that sometimes solves the prompts (SFT warm-up)")

    def step_metrics(self, step: int) -> dict[str, Any]:
        st = self.loss.stats
        return {**{k: round(v, 6) for k, v in self.last.items()}, "grpo/kl": mean_stat(st, "kl"),
                "grpo/clip_ratio": mean_stat(st, "clip")}

    def evaluate(self, r, s) -> dict[str, float]:
        """Mean reward of greedy answers to the eval prompts (every rank answers all of them, in lockstep)."""
        total, dist = 0.0, r.dist
        with generation_mode(s.model, r.prev_attn), dist.full_params(s.loss_mod):
            for p in r.eval_examples:
                c = sample_group(s.model, r.tok, p.input_ids, 1, max_new_tokens=self.g.max_completion_length,
                                 device=r.device, greedy=True, synced=dist.lockstep)[0]
                total += score(self.rewards, c.text, p.record)[0]
        return {"eval_reward": total / max(1, len(r.eval_examples))}

    # -- checkpoint, manifest, plots
    def state_dict(self) -> dict[str, Any]:
        return {"zero_advantage_steps": self.zero_steps}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.zero_steps = int(st.get("zero_advantage_steps", 0))

    def manifest(self, history: list[dict]) -> dict[str, Any]:
        recs = [h["objective"] for h in history if "grpo/reward" in (h.get("objective") or {})]
        return {"objective": "grpo", "objective_config": self.g.model_dump(mode="json"),
                "reference": ("base, adapters disabled" if self.cfg.train.method in ("lora", "dora", "qlora")
                              else "frozen copy of the base") if self.g.beta else None,
                "reward_first": recs[0]["grpo/reward"] if recs else None,
                "reward_last": recs[-1]["grpo/reward"] if recs else None, "plot": "rewards.png"}

    def plot(self, history: list[dict], stage_dir: Path) -> None:
        from dsft.train.objectives.plots import plot_series

        plot_series(history, ["grpo/reward", "grpo/completion_len", "grpo/truncated", "grpo/kl"],
                    stage_dir / "rewards.png", title="GRPO", band={"grpo/reward": "grpo/reward_std"})
