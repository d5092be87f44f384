"""The trainer's setup, public: base model, method (LoRA/DoRA/QLoRA/full/freeze), precision, loss module, AdamW.

`dsft.train.stage` builds a run from these, and the memory planner's measurements (`dsft.train.measure`) call the
same functions, so what the planner is validated against is what `dsft train` runs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsft.config import Config
from dsft.errors import TrainError
from dsft.train.encode import IGNORE, Encoded
from dsft.train.hparams import Hyperparameters, hyperparameters
from dsft.train.loss import CausalLMLoss, release_buffers, unwrap
from dsft.train.step import apply_update, forward_backward, unscale_and_clip

__all__ = [
    "IGNORE", "Encoded", "Hyperparameters", "apply_method", "autocast_for", "build_loss", "count_params",
    "enable_checkpointing", "fp32_master_weights", "hyperparameters", "keep_router_fp32", "load_base",
    "make_optimizer", "make_scaler", "release_buffers", "resolve_precision", "single_process", "training_step",
]


def count_params(model) -> int:
    """Parameters, counting the frozen FP8 weights (held as buffers by dsft.model.fp8_linear) too."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                          if n.endswith("weight_fp8"))


def is_router(name: str) -> bool:
    """The MoE router's parameters (they stay frozen and fp32 under every method)."""
    return name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias", ".router.weight"))


# ---------------------------------------------------------------- the base model
def load_base(cfg: Config, model_dir: Path, device: torch.device):
    """The base model on `device` in model.dtype, or in NF4 for method qlora."""
    from dsft.model.base_checkpoint import is_fp8_checkpoint
    from dsft.model.load import load_model

    if is_fp8_checkpoint(model_dir) and cfg.train.method not in ("lora", "dora"):  # the FP8 base stays frozen
        raise TrainError(f"train.method {cfg.train.method}: {model_dir} is an FP8 checkpoint, trained with lora or "
                         f"dora on the frozen e4m3 base; full/freeze/qlora need a BF16 copy (DeepSeek's fp8_cast_bf16.py)")
    if cfg.train.mtp_loss_weight > 0:
        check_mtp(cfg, model_dir)
    if cfg.train.method == "qlora":
        return load_qlora_base(cfg, model_dir, device)
    model = load_model(model_dir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    if cfg.train.mtp_loss_weight > 0:
        from dsft.model.base_checkpoint import read_base_checkpoint
        from dsft.model.fp8_mtp import attach_mtp

        attach_mtp(model, model_dir, read_base_checkpoint(model_dir) or {})
    return model.to(device)


def check_mtp(cfg: Config, model_dir: Path) -> None:
    """train.mtp_loss_weight > 0 needs an FP8 DeepSeek-V3 folder with its MTP layer and the sft objective."""
    from dsft.model.base_checkpoint import read_base_checkpoint

    w = cfg.train.mtp_loss_weight
    ckpt = read_base_checkpoint(model_dir) or {}
    if ckpt.get("format") != "fp8" or not ckpt.get("mtp_layers"):
        raise TrainError(f"train.mtp_loss_weight {w}: {model_dir} is not a shipped FP8 DeepSeek-V3 folder with an MTP "
                         f"layer (format {ckpt.get('format', 'unknown')}, MTP layers {ckpt.get('mtp_layers', [])}); "
                         f"set train.mtp_loss_weight 0")
    if cfg.train.objective != "sft":
        raise TrainError(f"train.mtp_loss_weight {w}: the MTP loss is added to the sft objective only, not "
                         f"{cfg.train.objective}")
    from dsft.model.load import model_type_of

    if model_type_of(model_dir) != "deepseek_v3":
        raise TrainError(f"train.mtp_loss_weight {w}: implemented for model_type deepseek_v3 (DeepSeek-V3/R1/V3.1), "
                         f"not {model_type_of(model_dir)}")


def load_qlora_base(cfg: Config, model_dir: Path, device: torch.device):
    """The base in NF4 (bitsandbytes): on the GPU with bf16 compute, or on the CPU backend with fp32 compute."""
    from dsft.model import bnb

    why = bnb.bnb_missing_reason()
    if why:
        raise TrainError(f"train.method qlora {why} (or: pip install 'dsft[qlora]')")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dmap = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    q = bnb.quant_config("nf4", training=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=q,
                                                     dtype=q.bnb_4bit_compute_dtype, use_safetensors=True,
                                                     trust_remote_code=cfg.model.trust_remote_code, device_map=dmap)
    except Exception as err:
        raise TrainError(f"train.method qlora: cannot load {model_dir} in NF4 ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    bnb.guard_cpu_packing(model, training=True)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)


def keep_router_fp32(model) -> None:
    """The MoE router computes in fp32 whatever the model's dtype."""
    for name, mod in model.named_modules():
        if name.endswith(".mlp.gate") and type(mod).__name__.endswith("Router"):
            mod.to(torch.float32)


# ---------------------------------------------------------------- the method
def apply_method(model, cfg: Config, hp: Hyperparameters, *, esft=None) -> tuple[Any, dict[str, Any]]:
    """Apply the fine-tuning method; return (model to train, info for the manifest and the console).
    esft: method esft's expert selection (`dsft.train.esft.Selection`; default: the config's esft.experts)."""
    method = cfg.train.method
    n_params = count_params(model)
    info: dict[str, Any] = {"method": method}
    keep_router_fp32(model)
    if method in ("lora", "dora", "qlora"):
        model = _attach_adapters(model, cfg, hp, info)
    elif method == "full":
        for n, p in model.named_parameters():
            p.requires_grad = not is_router(n)
    elif method == "freeze":
        _unfreeze_last_layers(model, cfg, info)
    elif method == "esft":
        from dsft.train.esft import apply_esft, selection_from_config

        sel = esft or selection_from_config(cfg.esft)
        if sel is None:
            raise TrainError("train.method esft: no expert selection (profile the data with `dsft esft profile CONFIG` "
                             "inside `dsft train`, or set esft.experts)")
        info.update(apply_esft(model, sel))
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = n_params
    if info["trainable_params"] == 0:
        raise TrainError(f"train.method {method}: no parameter is trainable (check lora.target_modules / freeze_* keys)")
    return model, info


def _attach_adapters(model, cfg: Config, hp: Hyperparameters, info: dict[str, Any]):
    from dsft.model.adapters import adapted_module_names, attach_lora, default_modules_to_save

    mts = default_modules_to_save(model) if hp.modules_to_save == "default" else hp.modules_to_save
    use_dora = cfg.lora.use_dora or cfg.train.method == "dora"
    model, targets = attach_lora(model, cfg.lora, modules_to_save=mts, r=hp.lora_r, alpha=hp.lora_alpha,
                                 use_dora=use_dora)
    info.update(r=hp.lora_r, alpha=hp.lora_alpha, use_rslora=cfg.lora.use_rslora, use_dora=use_dora,
                dropout=cfg.lora.dropout, modules_to_save=mts, targets=targets.summary(),
                adapted=adapted_module_names(model))
    return model


def _unfreeze_last_layers(model, cfg: Config, info: dict[str, Any]) -> None:
    """Method freeze: train the last freeze_trainable_layers layers and freeze_trainable_modules, never the router."""
    tc = cfg.train
    for p in model.parameters():
        p.requires_grad = False
    layers = unwrap(model).get_decoder().layers
    k = min(tc.freeze_trainable_layers, len(layers))
    first = len(layers) - k
    pats = [re.compile(m) for m in tc.freeze_trainable_modules]
    for n, p in model.named_parameters():
        layer_idx = re.search(r"\.layers\.(\d+)\.", n)
        in_last = layer_idx is not None and int(layer_idx.group(1)) >= first
        if (in_last or any(pt.search(n) for pt in pats)) and not is_router(n):
            p.requires_grad = True
    info.update(trainable_layers=list(range(first, len(layers))), trainable_modules=tc.freeze_trainable_modules)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant) on the transformers model inside any wrapper."""
    inner = unwrap(model)
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# ---------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device) -> str:
    """auto → bf16 on a bf16 GPU, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward pass's autocast context for a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dt = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dt)


def fp32_master_weights(model) -> int:
    """fp16 training: trainable parameters held in fp32 (the optimizer's master copy); returns how many were cast.

    The frozen base may stay 16-bit; autocast runs the matmuls in fp16 and GradScaler keeps the gradients finite.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            n += 1
    return n


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 (none for fp32 / bf16)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# ---------------------------------------------------------------- loss and optimizer
def build_loss(model, chunk_size: int = 4096, mtp_weight: float = 0.0) -> CausalLMLoss:
    """The loss module the loop differentiates: LM head + cross-entropy only where labels exist, in chunks
    (+ λ × the MTP cross-entropy when mtp_weight λ > 0 and the MTP layer is attached)."""
    return CausalLMLoss(model, chunk_size, mtp_weight)


def make_optimizer(model, cfg: Config, hp: Hyperparameters) -> tuple[torch.optim.AdamW, dict[int, str]]:
    """AdamW; no weight decay on biases, norms and 1-D parameters; β2 from the hyperparameters. Returns
    (optimizer, {id(parameter): name}) — the names key the optimizer state in checkpoints."""
    decay, no_decay, names = [], [], {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names[id(p)] = n
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate,
                            betas=(cfg.train.adam_beta1, hp.adam_beta2), foreach=True)
    return opt, names


# ---------------------------------------------------------------- one step (what the planner measures)
def single_process(device: str | torch.device):
    """The loop's process handle (`dsft.train.dist.Dist`) for one process on `device`."""
    from dsft.train.dist import Dist

    return Dist(device=str(device))


def training_step(loss_mod, opt, examples: list[Encoded], *, dist, micro: int, packing: bool, capacity: int,
                  pad_id: int, max_grad_norm: float, autocast=contextlib.nullcontext, scaler=None) -> float:
    """One optimizer step as `dsft train` runs it, without LR schedule, OOM ladder or monitor; the mean token loss."""
    n_labels = sum(e.n_labels for e in examples)
    loss_sum, _ = forward_backward(loss_mod, examples, micro=micro, n_labels=n_labels, packing=packing,
                                   capacity=capacity, pad_id=pad_id, dist=dist, autocast=autocast, scaler=scaler)
    params = [p for g in opt.param_groups for p in g["params"]]
    unscale_and_clip(dist, opt, scaler, params, max_grad_norm)
    apply_update(dist, opt, scaler)
    return loss_sum / max(1, n_labels)
