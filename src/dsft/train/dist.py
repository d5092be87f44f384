"""Multi-process training through accelerate: launcher (`--nproc N`), generated ddp/fsdp/deepspeed configs, worker helpers.

`dsft train CONFIG --nproc N` writes `<run_dir>/accelerate_<strategy>.yaml` from the `train:` section and
re-runs itself under `accelerate launch`; `accelerate launch -m dsft train CONFIG` works the same with a
config of your own. In a worker (WORLD_SIZE > 1) the loop wraps its loss module with `Accelerator.prepare`
(DDP or FSDP, as the launcher said; FSDP on CPU, which accelerate refuses, is FSDP2 `fully_shard` over gloo
applied here); DeepSpeed, on GPUs and on CPU (gloo), is one `deepspeed.initialize` of the loss module and the
AdamW here, driven with engine.backward / engine.step (`deepspeed_config`). The loop splits each step's micro-batches across ranks and divides the
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
        # what the dsft worker does with deepspeed.initialize (see `deepspeed_config`): it reads zero_stage and the
        # offload devices back from the environment accelerate launch sets from these keys; it loads the full model
        # on every rank and lets the engine partition it (no zero.Init) and gathers weights itself (no 16-bit save)
        base["deepspeed_config"] = {
            "zero_stage": tc.zero_stage, "gradient_accumulation_steps": tc.gradient_accumulation_steps,
            "gradient_clipping": tc.max_grad_norm,
            "offload_optimizer_device": "cpu" if tc.offload and not cpu else "none",
            "offload_param_device": "cpu" if tc.offload and tc.zero_stage == 3 and not cpu else "none",
            "zero3_init_flag": False, "zero3_save_16bit_model": False,
        }
    return base


def deepspeed_config(tc, *, micro: int, accum: int, world: int, zero_stage: int,
                     offload_optimizer: str = "none", offload_param: str = "none") -> dict[str, Any]:
    """The DeepSpeed config the worker hands `deepspeed.initialize` (model + AdamW in one call).

    The loop owns the accumulation boundary (`managed_gradient_accumulation: false`: one `engine.backward` per
    micro-batch, unscaled, one `engine.step` per optimizer step), DeepSpeed clips at `train.max_grad_norm` inside
    `engine.step`, and dsft's torch AdamW runs on the ZeRO partitions (no compiled fused/CPU-Adam op). Mixed
    precision stays dsft's autocast: DeepSpeed's fp16/bf16 modes are off, so master weights are the model's own.
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer}
    if offload_param != "none" and zero_stage == 3:
        zero["offload_param"] = {"device": offload_param}
    return {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world, "managed_gradient_accumulation": False,
        "gradient_clipping": tc.max_grad_norm, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }


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
    from dsft.model.load import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.name_or_path)  # builds the embedded model once, before N ranks race to
    layer_cls = decoder_layer_class(model_dir) if tc.strategy == "fsdp" else None
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
def _fully_shard(loss_module):
    """FSDP2 by hand (CPU + gloo, where accelerate's FSDP plugin refuses): one unit per decoder layer + the root."""
    from torch.distributed.fsdp import fully_shard

    for m in list(loss_module.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(loss_module)
    return loss_module


def _relink_optimizer_state(zopt) -> None:
    """ZeRO-1/2 links each parameter's view of the AdamW moments once, after the first group's first step, when
    torch AdamW has not yet created the other groups' state (so with a decay and a no-decay group,
    safe_get_full_optimizer_state fails for the second: "exp_avg not found in optimizer state fragment"). Link
    again with the state as it is now (DeepSpeed's own lazy-link routine; ZeRO-3 reads the state directly)."""
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state") and hasattr(zopt, "_hp_optimizer_states_linked"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def _fp32_partitions(zopt) -> list:
    """This rank's flat fp32 master partitions, the tensors AdamW steps (ZeRO-3 puts them into the AdamW param groups
    only while it steps, so read them from the ZeRO optimizer)."""
    flat = getattr(zopt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flat is None:
        flat = getattr(zopt, "single_partition_of_fp32_groups", [])  # ZeRO-1/2
    return list(flat)


def _experts_as_z3_leaves(module) -> int:
    """ZeRO-3: the routed experts of each MoE block (the `experts` beside a router `gate`) are one leaf module
    (DeepSpeed's `set_z3_leaf_modules`, meant for MoE): no hooks on its children. Which experts run, and how often
    their activation module is called, depends on each rank's tokens; with hooks there, ZeRO-3's module trace differs
    between ranks and their parameter all-gathers stop matching (a hang, seen with ESFT on 8 experts). Returns the
    count."""
    import torch
    from deepspeed.utils import set_z3_leaf_modules_by_name

    names = [f"{n}.experts" for n, m in module.named_modules()
             if isinstance(getattr(m, "experts", None), torch.nn.Module) and getattr(m, "gate", None) is not None]
    if names:
        set_z3_leaf_modules_by_name(module, names)
        # a leaf gathers its parameters again for backward through a hook on its inputs' gradients: make the
        # embeddings' output require grad, so the leaves below the first trained layer get it too (ESFT)
        from dsft.train.loss import unwrap

        unwrap(getattr(module, "model", module)).enable_input_require_grads()
    return len(names)


def _full_numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


class Dist:
    """One process or one rank of many (through accelerate); the loop calls these instead of torch.distributed."""

    def __init__(self, tc=None, *, device: str | None = None):
        """device: force one process on this device (the planner's measurements), whatever WORLD_SIZE says."""
        import torch

        self.world = 1 if device else int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        self.rank = 0
        self.cpu_fsdp = False
        self.local_param_fraction = 1.0
        self.engine = None  # the DeepSpeed engine, once prepare_optimizer made it
        self.zero_stage: int | None = None
        self.local_optim_fraction = 1.0
        if self.world > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=not torch.cuda.is_available())
            self.rank = self.acc.process_index
            self.device = self.acc.device
            self.kind = str(self.acc.distributed_type).rsplit(".", 1)[-1]
            asked = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else (
                "DEEPSPEED" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None)
            if asked == "FSDP" and self.kind != "FSDP" and self.device.type == "cpu":
                # accelerate's FSDP plugin needs GPUs; FSDP2 (fully_shard) itself shards CPU tensors over gloo
                self.kind, self.cpu_fsdp = "FSDP", True
            elif asked == "DEEPSPEED":
                # dsft drives the engine itself (deepspeed.initialize on model + optimizer), on GPUs and on CPU, where
                # accelerate refuses DeepSpeed but DeepSpeed's CPU accelerator runs ZeRO over gloo
                self.kind = "DEEPSPEED"
                self.zero_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or (tc.zero_stage if tc else 2))
                if self.zero_stage not in (2, 3):
                    from dsft.errors import TrainError

                    raise TrainError(f"DeepSpeed ZeRO stage {self.zero_stage}: dsft runs stage 2 or 3")
            elif asked and asked != self.kind and self.is_main:
                print(f"dsft train: {asked} needs GPUs; on CPU accelerate runs plain data parallel ({self.kind})", flush=True)
        else:
            self.device = torch.device(device) if device else (
                torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
            self.kind = "single"

    @property
    def lockstep(self) -> bool:
        """Sharded runs: every rank must run the same number of forward/backward passes (collectives in each)."""
        return self.kind in ("FSDP", "DEEPSPEED")

    @property
    def label(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}" if self.kind == "DEEPSPEED" else self.kind

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module):
        if self.cpu_fsdp:
            module = _fully_shard(module)
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
            self.local_param_fraction = round(local / max(1, sum(p.numel() for p in module.parameters())), 4)
            if self.is_main:
                print(f"dsft train: FSDP2 on CPU (gloo): rank 0 holds {self.local_param_fraction:.1%} of the "
                      f"parameters", flush=True)
            return module
        if self.kind == "DEEPSPEED":  # wrapped with its optimizer in prepare_optimizer (one deepspeed.initialize)
            return module
        return self.acc.prepare(module) if self.acc is not None else module

    def prepare_optimizer(self, module, opt, *, tc, micro: int, accum: int):
        """(module, optimizer) to train with: under DeepSpeed, one `deepspeed.initialize` for both (the engine and
        its ZeRO optimizer, whose param_groups are the AdamW groups, so the loop still sets the LR per step)."""
        if self.kind != "DEEPSPEED":
            return module, opt
        import deepspeed

        if self.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (needs g++) that only inference
            # all-reduce uses; ZeRO training goes through gloo, so skip building it
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        off_opt = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or ("cpu" if tc.offload else "none")
        off_par = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or (
            "cpu" if tc.offload and self.zero_stage == 3 else "none")
        if self.device.type == "cpu" and "cpu" in (off_opt, off_par):
            if self.is_main:
                print("dsft train: train.offload: training runs on the CPU, whose memory the state already lives in — "
                      "nothing to offload", flush=True)
            off_opt = off_par = "none"
        from dsft.train.dist import deepspeed_config

        cfg = deepspeed_config(tc, micro=micro, accum=accum, world=self.world, zero_stage=self.zero_stage,
                               offload_optimizer=off_opt, offload_param=off_par)
        # moments a resumed checkpoint put into the plain AdamW: ZeRO re-homes the optimizer on flat partitions,
        # so take them out and write them into the partitions after initialize
        moments = {p: st for p, st in opt.state.items() if st}
        opt.state.clear()
        if self.zero_stage == 3:
            _experts_as_z3_leaves(module)
        engine, zopt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
        if not hasattr(engine, "managed_gradient_accumulation"):  # older DeepSpeed ignores the key: refuse
            from dsft.errors import TrainError

            raise TrainError(f"deepspeed {deepspeed.__version__} lacks managed_gradient_accumulation (the loop owns "
                             f"the accumulation boundary): pip install 'deepspeed>=0.19'")
        self.engine = engine
        if moments:
            self._load_moments(zopt, moments)
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        n = max(1, sum(_full_numel(p) for p in trainable))
        self.local_optim_fraction = round(sum(fp.numel() for fp in _fp32_partitions(zopt)) / n, 4)
        if self.zero_stage == 3:
            allp = list(engine.module.parameters())
            self.local_param_fraction = round(sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                                  for p in allp) / max(1, sum(_full_numel(p) for p in allp)), 4)
        if self.is_main:
            where = f"{self.device.type}" + (" (gloo)" if self.device.type == "cpu" else "")
            held = (f"rank 0 holds {self.local_param_fraction:.1%} of the parameters and "
                    if self.zero_stage == 3 else "rank 0 holds ")
            print(f"dsft train: {self.label} on {where}: {held}{self.local_optim_fraction:.1%} of the AdamW state"
                  + (f"; offload optimizer {off_opt}, parameters {off_par}" if "cpu" in (off_opt, off_par) else ""),
                  flush=True)
        return engine, zopt

    @staticmethod
    def _load_moments(zopt, moments: dict) -> None:
        """Full AdamW moments (from a checkpoint) into the ZeRO partitions; torch AdamW initialises its state lazily,
        so create it (zeros, the checkpoint's step) for the flat fp32 partitions first."""
        import torch
        from deepspeed.utils import safe_set_full_optimizer_state

        base = zopt.optimizer
        step = next(iter(moments.values())).get("step")
        for fp in _fp32_partitions(zopt):
            base.state[fp] = {"step": step.detach().clone().cpu() if step is not None else torch.tensor(0.0),
                              "exp_avg": torch.zeros_like(fp), "exp_avg_sq": torch.zeros_like(fp)}
        _relink_optimizer_state(zopt)
        for p, st in moments.items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    safe_set_full_optimizer_state(p, st[k].to(torch.float32), k)

    def step(self) -> float:
        """DeepSpeed: reduce/finalise the step's gradients, clip at gradient_clipping, apply AdamW, zero the grads;
        returns the (pre-clip) global gradient norm."""
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def no_sync(self, module, sync: bool):
        if self.engine is not None:  # ZeRO-2/3 reduce (scatter) each micro-batch's gradients; no no_sync there
            return contextlib.nullcontext()
        if self.cpu_fsdp:
            module.set_requires_gradient_sync(sync)  # FSDP2: skip the reduce-scatter until the last micro-batch
            return contextlib.nullcontext()
        if self.acc is None or sync:
            return contextlib.nullcontext()
        return self.acc.no_sync(module)

    def backward(self, loss) -> None:
        if self.engine is not None:  # the loop owns accumulation and already scaled the loss
            self.engine.backward(loss, scale_wrt_gas=False)
        elif self.acc is not None and not self.cpu_fsdp:
            self.acc.backward(loss)
        else:
            loss.backward()

    def clip(self, params, max_norm: float) -> float:
        import torch

        if self.cpu_fsdp:  # DTensor gradients: the norm comes back as a DTensor over all shards
            gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
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

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order; [obj] in one process. Every rank must call it."""
        if self.acc is None:
            return [obj]
        import torch

        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def full_params(self, module):
        """Generation outside the loss module's forward (GRPO rollouts): under FSDP2 the root unit's parameters
        (embeddings, final norm, LM head) are all-gathered for the block (`FSDPModule.unshard`, the supported way
        outside a forward); the decoder layers gather their own shards in their forward hooks. Under DeepSpeed ZeRO-3
        every submodule's hooks gather. Every rank must enter it (collective)."""
        if self.kind != "FSDP" or not hasattr(module, "unshard"):
            yield
            return
        # the root must be initialised as the root before any forward (at step 1 rollouts come first): FSDP2 does
        # that lazily in the root's first forward, and a decoder layer run first would claim the root role
        module._get_fsdp_state()._lazy_init()
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def full_state(self, module) -> dict:
        """Full (gathered) state dict of the prepared loss module; every rank must call it."""
        if self.acc is None:
            return module.state_dict()
        if self.engine is not None:
            return self._ds_full_state(self.engine.module)
        if self.cpu_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.acc.get_state_dict(module)

    @staticmethod
    def _ds_full_state(module) -> dict:
        """Gathered state dict under ZeRO: trainable weights from the fp32 master partitions, frozen ZeRO-3
        parameters gathered one at a time, everything else as it is. Every rank must call it."""
        import deepspeed
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for k, v in module.state_dict(keep_vars=True).items():
            if isinstance(v, torch.nn.Parameter) and v.requires_grad:
                t = safe_get_full_fp32_param(v)
                t = t.reshape(v.ds_shape if hasattr(v, "ds_shape") else v.shape).to(v.dtype)
            elif hasattr(v, "ds_id"):
                with deepspeed.zero.GatheredParameters([v]):
                    t = v.detach().clone()
            else:
                t = v.detach()
            out[k] = t.to("cpu").contiguous()
        return out

    def trainable_weights(self, module) -> dict:
        """{name: full fp32-master weight} of the trainable parameters under DeepSpeed (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in module.named_parameters():
            if p.requires_grad:
                t = safe_get_full_fp32_param(p)
                out[n] = t.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).to(p.dtype).cpu().contiguous()
        return out

    def full_optimizer_tensors(self, opt, names: dict[int, str]) -> dict:
        """AdamW moments gathered to full tensors (sharded FSDP2 on CPU, DeepSpeed ZeRO); every rank must call it."""
        out = {}
        if self.engine is not None:
            from deepspeed.utils import safe_get_full_optimizer_state

            base = opt.optimizer
            step = next((st["step"] for st in base.state.values() if "step" in st), None)
            _relink_optimizer_state(opt)
            for p in self.engine.module.parameters():
                if not p.requires_grad:
                    continue
                name = names[id(p)]
                shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
                for k in ("exp_avg", "exp_avg_sq"):
                    t = safe_get_full_optimizer_state(p, k)
                    if t is not None:
                        out[f"{name}.{k}"] = t.reshape(shape).detach().to("cpu").contiguous().clone()
                if step is not None:
                    out[f"{name}.step"] = step.detach().to("cpu").clone()
            return out
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    t = v.full_tensor() if hasattr(v, "full_tensor") else v
                    out[f"{names[id(p)]}.{k}"] = t.detach().to("cpu").contiguous().clone()
        return out

    def end(self) -> None:
        if self.acc is not None:
            self.acc.end_training()
