"""Multi-process training through accelerate: launcher (`--nproc N`), generated ddp/fsdp/deepspeed configs, worker helpers.

`dsft train CONFIG --nproc N` writes `<run_dir>/accelerate_<strategy>.yaml` from the `train:` section and
re-runs itself under `accelerate launch`; `accelerate launch -m dsft train CONFIG` works the same with a
config of your own. In a worker (WORLD_SIZE > 1) the loop wraps its loss module with `Accelerator.prepare`
(DDP, FSDP or DeepSpeed, as the launcher said), splits each step's micro-batches across ranks and divides the
summed token loss by the step's global label count, so N processes follow the loss curve of one process at
the same global batch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


# ---------------------------------------------------------------- launcher side (no torch import)
def accelerate_config(tc, *, n_gpu: int | None = None, mixed_precision: str = "no",
                      layer_cls: str | None = None) -> dict[str, Any]:
    """The accelerate config dict for train.strategy / nproc / num_machines / zero_stage / offload."""
    strategy = tc.strategy if tc.strategy != "auto" else "ddp"
    cpu = n_gpu == 0
    base: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "num_processes": tc.nproc * tc.num_machines,
        "num_machines": tc.num_machines, "machine_rank": tc.machine_rank, "mixed_precision": mixed_precision,
        "rdzv_backend": "static", "same_network": True, "use_cpu": cpu, "main_training_function": "main",
        "downcast_bf16": "no", "dynamo_config": {"dynamo_backend": "NO"},
    }
    if tc.num_machines > 1:
        base["main_process_ip"] = tc.main_process_ip or "127.0.0.1"
        base["main_process_port"] = tc.main_process_port
    else:  # one machine: a free local port, so two runs on one host do not collide
        base["main_process_port"] = _free_port()
    if strategy == "ddp":
        base["distributed_type"] = "MULTI_GPU"  # also right on CPU: the worker asks for gloo (Accelerator(cpu=True))
    elif strategy == "fsdp":
        base["distributed_type"] = "FSDP"
        base["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_cls or "", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": tc.offload,
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_use_orig_params": True, "fsdp_activation_checkpointing": tc.gradient_checkpointing,
        }
    else:
        base["distributed_type"] = "DEEPSPEED"
        base["deepspeed_config"] = {
            "zero_stage": tc.zero_stage, "gradient_accumulation_steps": tc.gradient_accumulation_steps,
            "gradient_clipping": tc.max_grad_norm,
            "offload_optimizer_device": "cpu" if tc.offload else "none",
            "offload_param_device": "cpu" if tc.offload and tc.zero_stage == 3 else "none",
            "zero3_init_flag": tc.zero_stage == 3, "zero3_save_16bit_model": tc.zero_stage == 3,
        }
    return base


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decoder_layer_class(model_dir: Path) -> str | None:
    """`DeepseekV3DecoderLayer` etc. from config.json's architectures (for FSDP auto-wrap)."""
    import json

    try:
        arch = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    except (OSError, KeyError, IndexError, ValueError):
        return None
    return arch.replace("ForCausalLM", "DecoderLayer")


def launch(cfg, argv: list[str], *, nproc: int) -> int:
    """Re-run `dsft train` under `accelerate launch` with a generated config; returns its exit code."""
    from dsft.errors import TrainError

    tc = cfg.train.model_copy(update={"nproc": nproc})
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        n_gpu = 0
    if n_gpu and nproc > n_gpu:
        raise TrainError(f"--nproc {nproc}: only {n_gpu} GPU(s) visible")
    if tc.strategy == "deepspeed" and shutil.which("deepspeed") is None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise TrainError("train.strategy deepspeed needs the deepspeed package (pip install 'dsft[deepspeed]')") from err
    layer_cls = None
    if tc.strategy == "fsdp":
        from dsft.model.load import resolve_model_dir

        layer_cls = decoder_layer_class(resolve_model_dir(cfg.model.name_or_path))
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(tc.precision, "bf16" if n_gpu else "no")
    acfg = accelerate_config(tc, n_gpu=n_gpu, mixed_precision=mp, layer_cls=layer_cls)
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"accelerate_{acfg['distributed_type'].lower()}.yaml"
    path.write_text(yaml.safe_dump(acfg, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
           "--num_processes", str(acfg["num_processes"]), "-m", "dsft", "train", *argv]
    print(f"dsft train: launching {nproc} processes ({acfg['distributed_type']}) with {path}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "DSFT_LAUNCHED": "1"}
    return subprocess.call(cmd, env=env)


# ---------------------------------------------------------------- worker side
class Dist:
    """One process or one rank of many (through accelerate); the loop calls these instead of torch.distributed."""

    def __init__(self):
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        self.rank = 0
        if self.world > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=not torch.cuda.is_available())
            self.rank = self.acc.process_index
            self.device = self.acc.device
            self.kind = str(self.acc.distributed_type).rsplit(".", 1)[-1]
            asked = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else (
                "DEEPSPEED" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None)
            if asked and asked != self.kind and self.is_main:
                print(f"dsft train: {asked} needs GPUs; on CPU accelerate runs plain data parallel ({self.kind})", flush=True)
        else:
            self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
            self.kind = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module):
        return self.acc.prepare(module) if self.acc is not None else module

    def prepare_optimizer(self, opt):
        return self.acc.prepare(opt) if self.acc is not None and self.kind == "DEEPSPEED" else opt

    def no_sync(self, module, sync: bool):
        if self.acc is None or sync:
            return contextlib.nullcontext()
        return self.acc.no_sync(module)

    def backward(self, loss) -> None:
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()

    def clip(self, params, max_norm: float) -> float:
        import torch

        if self.acc is not None:
            return float(self.acc.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def sum(self, *values: float) -> list[float]:
        if self.acc is None:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def full_state(self, module) -> dict:
        """Full (gathered) state dict of the prepared loss module; every rank must call it."""
        if self.acc is None:
            return module.state_dict()
        return self.acc.get_state_dict(module)

    def end(self) -> None:
        if self.acc is not None:
            self.acc.end_training()
