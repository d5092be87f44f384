"""GRPO rollouts on vLLM: an in-process engine built from the base model folder, the policy's weights pushed in.

`grpo.rollout_backend` picks transformers (the training model samples, dsft.train.objectives.rollout) or vLLM.
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 while it is built), so a weight sync is a
copy in memory: before each step's rollouts the policy's weights (LoRA merged on the fly, the training model
untouched) go through the worker's `reload_weights` (vLLM's in-place reload: the model's checkpoint loader, then its
post-load processing), and the prefix cache is reset (it holds KV blocks of the old weights). Each prompt draws its
G completions with SamplingParams(seed=sampler_seed(train.seed, step, slot)), so a resumed run samples what the
uninterrupted one did (on the same engine build); the returned Completions are the transformers sampler's, so
scoring, guards, advantages and the loss do not change. Log-probs for the loss come from the training model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsft.errors import TrainError
from dsft.model.base_checkpoint import is_fp8_checkpoint
from dsft.model.vllm_platform import vllm_device, vllm_dtype, vllm_memory_kwargs
from dsft.train.objectives.policy_weights import policy_state_dict
from dsft.train.objectives.rollout import Completion, to_completion

KEY = "grpo.rollout_backend"
FIX = "use grpo.rollout_backend: transformers"
# KV cache of vLLM's CPU build for rollouts when $VLLM_CPU_KVCACHE_SPACE is not set: rollouts are short
CPU_ROLLOUT_KV_CACHE = 1 << 30


# config.json keys of the architectures whose in-place reload does not reproduce the policy (checked with vLLM 0.32's
# CPU build on a tiny DeepSeek-V3: its MLA absorbed matrices W_UK_T/W_UV are not recomputed, and the routed experts
# reloaded from transformers' reverted layout answer differently; tests/train/test_grpo_vllm.py)
UNSYNCABLE = {"kv_lora_rank": "MLA attention", "n_routed_experts": "MoE experts", "num_experts": "MoE experts",
              "num_local_experts": "MoE experts"}


def resolve_backend(cfg, device_type: str, world: int = 1, model_dir: Path | None = None) -> str:
    """'vllm' or 'transformers' for grpo.rollout_backend on a training device of type `device_type` (cpu/cuda) with
    `world` processes. auto: vLLM only when it is usable, on CUDA, and can take this policy; vllm: all of that, else
    one clear error."""
    asked = cfg.grpo.rollout_backend
    if asked == "transformers":
        return "transformers"
    where = vllm_device()
    if asked == "auto":
        return "vllm" if where == "cuda" and device_type == "cuda" and not refusal(cfg, world, model_dir) \
            else "transformers"
    if where is None:
        raise TrainError(f"{KEY}: vllm asked for but vLLM is not usable here (needs `pip install dsft[vllm]` and a "
                         f"CUDA GPU, or vLLM's CPU build); {FIX}")
    if where != device_type:
        raise TrainError(f"{KEY}: vllm runs on {where} but training runs on {device_type} (the weights are synced in "
                         f"memory, both must share the device); {FIX}")
    why = refusal(cfg, world, model_dir)
    if why:
        raise TrainError(f"{KEY}: vllm {why}; {FIX}")
    return "vllm"


def _unsyncable(model_dir: Path | None) -> str | None:
    """What in the model folder's architecture vLLM's in-place weight reload does not reproduce (None: nothing)."""
    try:
        conf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")) if model_dir else {}
    except (OSError, ValueError):
        return None
    found = sorted({what for key, what in UNSYNCABLE.items() if conf.get(key)})
    return f"{conf.get('model_type', '?')} ({' and '.join(found)})" if found else None


def refusal(cfg, world: int = 1, model_dir: Path | None = None) -> str | None:
    """Why this run's policy cannot be rolled out on vLLM (None when it can)."""
    tc = cfg.train
    world = max(world, tc.nproc * tc.num_machines)
    method = "dora" if tc.method in ("lora", "dora") and (cfg.lora.use_dora or tc.method == "dora") else tc.method
    if method in ("dora", "qlora", "esft"):
        return (f"cannot sync a train.method {method} policy (vLLM's weight reload takes plain weights: DoRA's "
                f"magnitude, NF4 bases and ESFT's expert split are not merged on the fly)")
    if world > 1:
        return (f"runs one engine in one process, not one per rank of {world} processes (--nproc / train.nproc, "
                f"train.num_machines); train with --nproc 1")
    if model_dir is not None and is_fp8_checkpoint(Path(model_dir)):
        return "cannot merge LoRA into an FP8 (e4m3) base on the fly (train on a BF16 copy of the base)"
    arch = _unsyncable(model_dir)
    if arch:
        return (f"cannot sync the weights of {arch}: vLLM's in-place reload does not reproduce the policy there "
                f"(its greedy answers differ after a sync)")
    return None


@contextlib.contextmanager
def _in_process_engine() -> Iterator[None]:
    """vLLM's engine core in this process (the weights are then reachable without a copy across processes); the
    environment, torch.set_num_threads (which vLLM's CPU worker replaces with a no-op) and the random states (which
    it reseeds) are restored after, so building the engine changes nothing of the training run."""
    import numpy as np
    import torch

    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")}
    set_threads = torch.set_num_threads
    rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # never pin the trainer's own threads
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VllmRollouts:
    """One colocated vLLM engine for a GRPO run: `sync(model)` before a step's rollouts, `sample(...)`, `close()`."""

    def __init__(self, cfg, model_dir: Path, tok):
        try:
            from vllm import LLM
        except ImportError as err:
            raise TrainError(f"{KEY}: vllm cannot be imported ({err}); {FIX}") from err
        self.tok, self.device = tok, vllm_device()
        kw: dict[str, Any] = vllm_memory_kwargs(self.device, cfg.grpo.vllm_gpu_memory_utilization,
                                                CPU_ROLLOUT_KV_CACHE)
        try:
            with _in_process_engine():
                self.llm = LLM(model=str(model_dir), tokenizer=str(cfg.model.tokenizer or model_dir),
                               dtype=vllm_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code,
                               seed=cfg.train.seed, max_model_len=cfg.data.max_seq_length, generation_config="vllm",
                               **kw)
                self._smoke()
        except Exception as err:
            if getattr(self, "llm", None) is not None:
                self.close()
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise TrainError(f"{KEY}: vLLM ({self.device}) cannot run {model_dir.name} ({type(err).__name__}: "
                             f"{first}); {FIX}") from err

    def _smoke(self) -> None:
        """One greedy token: vLLM picks some kernels (e.g. its CPU MLA kernel) at the first forward, so a model it
        cannot run fails here, at the start, and not in the first step's rollouts."""
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [self.tok.eos_token_id or 0]}],
                          SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)

    def sync(self, model) -> None:
        """Push the policy's current weights into the engine and drop the KV blocks computed with the old ones."""
        weights = list(policy_state_dict(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[list[int]], n: int, *, max_new_tokens: int, seeds: list[int],
               temperature: float = 1.0, top_p: float = 1.0) -> list[list[Completion]]:
        """n completions of each prompt (prompt i drawn with seeds[i]); greedy when temperature is 0."""
        from vllm import SamplingParams

        eos = self.tok.eos_token_id
        # stop at the tokenizer's end token only, as the transformers sampler (not at generation_config's extras)
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                                 seed=s, ignore_eos=True, stop_token_ids=[eos], detokenize=False) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        groups = []
        for o in outs:
            rows = []
            for c in o.outputs:
                row = list(c.token_ids)
                if c.finish_reason == "stop" and (not row or row[-1] != eos):
                    row.append(eos)  # a build that leaves the stop token out of token_ids
                rows.append(to_completion(self.tok, row))
            groups.append(rows)
        return groups

    def close(self) -> None:
        """Stop the engine and free its weights and KV cache."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
