"""Measure the real CPU peak of DPO / ORPO / SimPO / GRPO optimizer steps of tiny models, the way
dsft.train.measure measures SFT steps (torch's CPU allocator events under the profiler, from before the model is
built to after the last step), running the trainer's own pieces: dsft.train.setup (method, AdamW), the objective
from dsft.train.objectives (its reference, loss module, collate, GRPO's prepare_step that samples the rollouts
with transformers' generate) and dsft.train.step's forward_backward / unscale_and_clip / apply_update.

Run as `python objective_measure.py -` with a JSON list of specs on stdin (a fresh process); one JSON line each.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ObjSpec:
    objective: str  # dpo | orpo | simpo | grpo
    arch: str = "llama"  # a key of dsft.train.measure.TINY_SHAPES
    method: str = "lora"
    seq_len: int = 128
    batch: int = 2  # pairs (dpo/orpo/simpo) or prompts (grpo) per micro-batch
    gc: bool = False
    num_generations: int = 4
    max_completion_length: int = 32
    beta: float = 0.0
    label_fraction: float = 0.5  # pairs: the answer's share of each sequence
    lora_rank: int = 8
    steps: int = 2
    shape: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        g = (f" G{self.num_generations} C{self.max_completion_length}" + (f" beta{self.beta:g}" if self.beta else "")
             if self.objective == "grpo" else "")
        return (f"{self.objective} {self.arch} {self.method} seq{self.seq_len} b{self.batch}{g}"
                + (" gc" if self.gc else "") + (f" vocab{self.shape['vocab_size']}" if "vocab_size" in self.shape else ""))

    def hf_config(self) -> dict[str, Any]:
        from dsft.train.measure import TINY_SHAPES

        return {**TINY_SHAPES[self.arch], **self.shape}


def dsft_config(spec: ObjSpec):
    from dsft.config import config_from_dict

    return config_from_dict({
        "data": {"max_seq_length": spec.seq_len},
        "train": {"objective": spec.objective, "method": spec.method, "gradient_checkpointing": spec.gc,
                  "precision": "fp32", "packing": True, "report_to": ["none"]},
        "lora": {"r": spec.lora_rank, "dropout": 0.1},
        # every completion runs to max_completion_length here: keep the truncation guard to a warning
        "grpo": {"num_generations": spec.num_generations, "max_completion_length": spec.max_completion_length,
                 "beta": spec.beta, "max_truncated_ratio": 1.0, "guard_warmup_steps": 10_000}})


def plan_request(spec: ObjSpec):
    """What the planner is asked for this spec (one sequence per row, as the SFT validation specs)."""
    from dsft.plan.api import PlanRequest, arch_from_hf_config, cpu_device

    return PlanRequest(arch=arch_from_hf_config(spec.hf_config(), name=spec.arch), method=spec.method,
                       seq_len=spec.seq_len, micro_batch=spec.batch, precision="fp32", gradient_checkpointing=spec.gc,
                       gpu=cpu_device(), lora_rank=spec.lora_rank, lora_dropout=0.1, attn="sdpa",
                       label_fraction=spec.label_fraction, packing=False, objective=spec.objective,
                       num_generations=spec.num_generations, max_completion_length=spec.max_completion_length,
                       beta=spec.beta)


class _Tok:
    """The tokenizer surface GRPO's sampler uses; its end token is never generated, so every completion runs to
    max_completion_length (the planner's upper bound) and the rewards score empty text."""

    def __init__(self, vocab: int):
        self.eos_token_id = vocab + 7
        self.pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def _build(spec: ObjSpec, dcfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsft.train import setup

    raw = spec.hf_config()
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    hp = setup.hyperparameters(dcfg, setup.count_params(model))
    model, _ = setup.apply_method(model, dcfg, hp)
    model.train()
    if spec.gc:
        setup.enable_checkpointing(model)
    return model, hp


def _units(spec: ObjSpec, g) -> list:
    """One micro-batch of random pairs (prompt + answer, each sequence seq_len long) or prompts."""
    import torch

    from dsft.train.encode import IGNORE, Encoded
    from dsft.train.objectives.encode import PairExample, PromptExample

    vocab = spec.hf_config()["vocab_size"]
    if spec.objective == "grpo":
        room = spec.seq_len - spec.max_completion_length
        ids = torch.randint(0, vocab, (spec.batch, room), generator=g).tolist()
        return [PromptExample(row, record={"answer": "7"}, record_id=f"p{k}") for k, row in enumerate(ids)]
    prompt = int(round(spec.seq_len * (1 - spec.label_fraction)))

    def seq() -> Encoded:
        row = torch.randint(0, vocab, (spec.seq_len,), generator=g).tolist()
        return Encoded(row, [IGNORE] * (prompt + 1) + row[prompt + 1:])

    return [PairExample(seq(), seq(), f"pair{k}") for k in range(spec.batch)]


def _steps(spec: ObjSpec) -> float:
    import types

    import torch

    from dsft.train import setup
    from dsft.train.objectives import for_config
    from dsft.train.step import apply_update, forward_backward, unscale_and_clip

    dcfg = dsft_config(spec)
    model, hp = _build(spec, dcfg)
    obj = for_config(dcfg)
    dist = setup.single_process("cpu")
    r = types.SimpleNamespace(tc=dcfg.train, tok=_Tok(spec.hf_config()["vocab_size"]), device=torch.device("cpu"),
                              prev_attn=None, dist=dist)
    loss_mod = obj.build_loss(model, r)
    s = types.SimpleNamespace(model=model, monitor=types.SimpleNamespace(event=lambda *a, **k: None),
                              ladder=types.SimpleNamespace(micro_batch=spec.batch), loss_mod=loss_mod)  # decoded together
    opt, _ = setup.make_optimizer(model, dcfg, hp)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    g = torch.Generator().manual_seed(0)
    loss = 0.0
    for step in range(spec.steps):
        units, n = obj.prepare_step(r, s, step, _units(spec, g))
        micro = spec.batch * obj.units_per_example  # the loop's micro: micro-batch × units per example
        total, _ = forward_backward(loss_mod, units, micro=micro, n_labels=n, packing=True, capacity=spec.seq_len,
                                    pad_id=0, dist=dist, collate_fn=obj.collate)
        unscale_and_clip(dist, opt, None, params, dcfg.train.max_grad_norm)
        apply_update(dist, opt, None)
        loss = total / max(1, n)
    del model
    return float(loss)


def measure(spec: ObjSpec) -> dict[str, Any]:
    """Peak bytes torch's CPU allocator held during model build + `steps` optimizer steps of this spec."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsft.train.setup import release_buffers

    torch.manual_seed(0)
    release_buffers()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        loss = _steps(spec)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return {"label": spec.label, "measured": int(peak), "loss": loss}


def measure_in_subprocess(specs: list[ObjSpec], timeout: float = 600) -> list[dict[str, Any]]:
    import os
    import subprocess

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "-"], input=json.dumps([asdict(s) for s in specs]),
                       capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement failed: {r.stderr.strip()[-2000:] or r.returncode}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def compare(spec: ObjSpec, measured: int) -> dict[str, Any]:
    from dsft.plan.api import estimate

    est = estimate(plan_request(spec))
    return {"config": spec.label, "estimated": int(est.allocated), "measured": int(measured),
            "error_pct": 100.0 * (est.allocated - measured) / measured, "phase": est.phase}


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    for raw in json.loads(sys.stdin.read()):
        print(json.dumps(measure(ObjSpec(**raw))), flush=True)
