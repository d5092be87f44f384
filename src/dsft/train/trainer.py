"""The train stage: data manifest → encoded chats → method (LoRA/DoRA/QLoRA/full/freeze) → loop → adapter + manifest.

One readable loop (no HF Trainer): each optimizer step takes a fixed, seed-determined list of samples,
splits it into micro-batches (packed by default), and divides the summed token loss by the step's label
count, so the gradient does not depend on how the step is split. That is what makes the OOM ladder
(smaller micro-batches, same effective batch) and packing exact, and resume bit-exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.config import Config
from dsft.errors import DataError, OverwriteError, TrainError
from dsft.model.info import preset_for_run
from dsft.run import RunDir, atomic_write_text, read_jsonl
from dsft.train import checkpoint as ck
from dsft.train.batching import StepPlan, collate_packed, collate_padded, real_tokens, split_micro
from dsft.train.dist import Dist
from dsft.train.encode import Encoded, dataset_fingerprint, encode_records
from dsft.train.loss import CausalLMLoss, unwrap
from dsft.train.monitor import Monitor
from dsft.train.offload import offload_available

log = logging.getLogger("dsft.train")

FaultHook = Callable[[int, int], None]
"""fault_hook(step, micro_batch_size) runs before every micro-batch (tests inject OOM with it)."""
EvalFn = Callable[[Any, int], dict]
"""eval_fn(model, step) → {"eval_loss": float, ...}; drives early stopping on `eval_fn.metric` (default eval_loss)."""


# ---------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, warmup: int, kind: str, cycle_fraction: float) -> float:
    """Multiplier of the base LR at 0-based optimizer step `step` (linear warmup, then the schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    cycles = max(1, round(1.0 / cycle_fraction))  # seed rule: one cycle = cycle_fraction of the steps
    return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))


# ---------------------------------------------------------------- model + method
def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _is_router(name: str) -> bool:
    return name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias", ".router.weight"))


def _load_base(cfg: Config, model_dir: Path, device: torch.device):
    from dsft.model.load import load_model

    if cfg.train.method == "qlora":
        return _load_qlora_base(cfg, model_dir, device)
    model = load_model(model_dir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    return model.to(device)


def _load_qlora_base(cfg: Config, model_dir: Path, device: torch.device):
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


def setup_method(model, cfg: Config, preset) -> tuple[Any, dict[str, Any]]:
    """Apply the fine-tuning method; return (model to train, info for the manifest and the console)."""
    from dsft.model.adapters import adapted_module_names, attach_lora, default_modules_to_save

    method = cfg.train.method
    n_params = _n_params(model)
    info: dict[str, Any] = {"method": method}
    for name, mod in model.named_modules():  # the MoE router stays fp32 and frozen
        if name.endswith(".mlp.gate") and type(mod).__name__.endswith("Router"):
            mod.to(torch.float32)
    if method in ("lora", "dora", "qlora"):
        mts = cfg.lora.modules_to_save
        if mts == "auto":
            mts = default_modules_to_save(model) if n_params < 100e6 else []
        r = cfg.lora.r or preset.lora_r
        alpha = cfg.lora.alpha or 2 * r
        model, targets = attach_lora(model, cfg.lora, modules_to_save=mts, r=r, alpha=alpha,
                                     use_dora=cfg.lora.use_dora or method == "dora")
        info.update(r=r, alpha=alpha, use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora or method == "dora",
                    dropout=cfg.lora.dropout, modules_to_save=mts, targets=targets.summary(),
                    adapted=adapted_module_names(model))
    elif method == "full":
        for n, p in model.named_parameters():
            p.requires_grad = not _is_router(n)
    elif method == "freeze":
        import re

        for p in model.parameters():
            p.requires_grad = False
        layers = unwrap(model).get_decoder().layers
        k = min(cfg.train.freeze_trainable_layers, len(layers))
        first = len(layers) - k
        pats = [re.compile(m) for m in cfg.train.freeze_trainable_modules]
        for n, p in model.named_parameters():
            layer_idx = re.search(r"\.layers\.(\d+)\.", n)
            in_last = layer_idx is not None and int(layer_idx.group(1)) >= first
            if (in_last or any(pt.search(n) for pt in pats)) and not _is_router(n):
                p.requires_grad = True
        info.update(trainable_layers=list(range(first, len(layers))), trainable_modules=cfg.train.freeze_trainable_modules)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = n_params
    if info["trainable_params"] == 0:
        raise TrainError(f"train.method {method}: no parameter is trainable (check lora.target_modules / freeze_* keys)")
    return model, info


def make_optimizer(model, cfg: Config, lr: float) -> tuple[torch.optim.AdamW, dict[int, str]]:
    """AdamW; no weight decay on biases, norms and 1-D parameters; β2 0.95 for full fine-tuning, else 0.999."""
    decay, no_decay, names = [], [], {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names[id(p)] = n
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith(".bias") else decay).append(p)
    beta2 = cfg.train.adam_beta2 or (0.95 if cfg.train.method in ("full", "freeze") else 0.999)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(cfg.train.adam_beta1, beta2),
                            foreach=True)
    return opt, names


# ---------------------------------------------------------------- OOM ladder
@dataclass
class Ladder:
    """Seed 5.2: halve micro-batch (accumulation doubles, effective batch unchanged) → checkpointing → offload."""

    micro_batch: int
    gradient_checkpointing: bool = False
    offload: bool = False
    can_offload: bool = False  # one process on an accelerator (FSDP/DeepSpeed offload through train.offload instead)

    def next_rung(self, model) -> str | None:
        if self.micro_batch > 1:
            self.micro_batch //= 2
            return f"micro-batch halved to {self.micro_batch} (gradient accumulation doubled; effective batch unchanged)"
        if not self.gradient_checkpointing:
            self.gradient_checkpointing = True
            enable_checkpointing(model)
            return "gradient checkpointing enabled"
        if self.can_offload and not self.offload:
            self.offload = True
            return "offload enabled: AdamW state + fp32 master weights and saved activations in host memory"
        return None


def _with_offload(opt, ladder: Ladder, monitor, step: int):
    """Swap in the host-offloaded AdamW once the ladder (or train.offload) turned offload on."""
    from dsft.train.offload import HostOffloadAdamW

    if not ladder.offload or isinstance(opt, HostOffloadAdamW):
        return opt
    opt = HostOffloadAdamW(opt)
    mib = opt.moved_bytes() / 2**20
    log.info("dsft train: offload: %.1f MiB of optimizer state and master weights in host memory", mib)
    monitor.event(step, "offload", host_mib=round(mib, 2))
    return opt


def _fwd_context(autocast, ladder: Ladder, device):
    """autocast plus, once offload is on, activations saved for backward kept in host memory."""
    from dsft.train.offload import activation_offload

    @contextlib.contextmanager
    def ctx():
        with autocast(), activation_offload(ladder.offload, device):
            yield
    return ctx


def enable_checkpointing(model) -> None:
    inner = unwrap(model)
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# ---------------------------------------------------------------- the stage
def _stage_paths(run: RunDir, resume: str | None, force: bool) -> Path:
    d = run.root / "train"
    if resume is None:
        if (d / "manifest.json").exists() or not (d / "checkpoints").exists() or force:
            return run.prepare_stage("train", force=force)
        raise OverwriteError(f"{d} holds checkpoints of an interrupted run: pass --resume auto to continue it, "
                             f"or --force to start over")
    if (d / "manifest.json").exists():
        raise OverwriteError(f"{d} already holds a finished training run; nothing to resume (--force starts over)")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_split(run: RunDir, manifest: dict, key: str) -> tuple[list[dict], Path | None]:
    rel = manifest.get(key)
    if not rel:
        return [], None
    p = Path(rel)
    if not p.is_absolute():
        p = run.root / "data" / p
    if not p.exists():
        raise DataError(f"{p}: the data manifest names this '{key}' file but it does not exist")
    return read_jsonl(p), p


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dt = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dt)), precision


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: Config, run: RunDir, resume: str | None = None, force: bool = False, *,
          resume_force: bool = False, eval_fn: EvalFn | None = None, fault_hook: FaultHook | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Run the train stage (see docs/ARCHITECTURE.md); returns the manifest it wrote."""
    from tqdm.auto import tqdm

    from dsft.model.load import resolve_model_dir
    from dsft.model.tokenizer import load_tokenizer

    tc = cfg.train
    data_m = run.read_manifest("data")
    records, train_path = _read_split(run, data_m, "train")
    if train_path is None:
        raise DataError(f"{run.manifest_path('data')}: key 'train': expected the path of train.jsonl")
    eval_records, _ = _read_split(run, data_m, "eval")
    dist = Dist(tc)
    if dist.is_main:
        stage = _stage_paths(run, resume, force)
    dist.barrier()
    stage = run.root / "train"
    ckpt_root = stage / "checkpoints"

    torch.manual_seed(tc.seed)
    device = dist.device
    model_dir = resolve_model_dir(cfg.model.name_or_path).resolve()
    tok = load_tokenizer(cfg.model.tokenizer or str(model_dir), trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    if tok.chat_template is None:
        raise TrainError(f"{model_dir}: the tokenizer has no chat template; set model.chat_template")
    max_len = cfg.data.max_seq_length
    examples, enc_rep = encode_records(tok, records, max_len, source=str(train_path))
    eval_examples = encode_records(tok, eval_records, max_len, source="eval.jsonl")[0] if eval_records else []
    fingerprint = dataset_fingerprint(examples)

    model = _load_base(cfg, model_dir, device)
    preset = preset_for_run(cfg, model_dir)
    model, info = setup_method(model, cfg, preset)
    model.train()
    prev_attn = None
    if tc.packing and (tc.packed_attention == "segments" or (tc.packed_attention == "auto" and device.type == "cpu")):
        from dsft.train.attention import use_packed_attention

        prev_attn = use_packed_attention(model)
    lr = tc.learning_rate or preset.learning_rate
    micro, accum = _plan_micro_batch(cfg, run, model_dir, preset, quiet=not dist.is_main)
    world = dist.world
    effective = micro * accum * world
    epochs = tc.num_train_epochs or preset.epochs
    plan = StepPlan(len(examples), effective, tc.seed, group_by_length=not tc.packing and tc.group_by_length,
                    lengths=tuple(len(e.input_ids) for e in examples))
    total_steps = tc.max_steps or max(1, math.ceil(epochs * plan.steps_per_epoch))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
    can_offload = offload_available(device) and dist.world == 1
    ladder = Ladder(micro_batch=micro, gradient_checkpointing=tc.gradient_checkpointing, can_offload=can_offload)
    if tc.offload and dist.world == 1:
        if can_offload:
            ladder.offload = True
        elif dist.is_main:
            print("dsft train: train.offload: training runs on the CPU, whose memory the state already lives in — "
                  "nothing to offload", flush=True)
    if tc.gradient_checkpointing:
        enable_checkpointing(model)
    loss_mod = dist.prepare(CausalLMLoss(model, tc.loss_chunk_size))
    if tc.compile and dist.world == 1:
        loss_mod = torch.compile(loss_mod, dynamic=True)
    opt, names = make_optimizer(model, cfg, lr)
    autocast, precision = _autocast(tc.precision, device)
    if dist.kind == "DEEPSPEED" and precision == "fp16":
        raise TrainError("train.strategy deepspeed with precision fp16: dsft keeps DeepSpeed's own loss scaling off "
                         "and torch's GradScaler cannot unscale a ZeRO optimizer; use precision bf16 (or fp32)")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    capacity = tc.pack_length or max_len
    if prev_attn is not None and not tc.pack_length:
        capacity = 1 << 30  # per-sample attention: one row per micro-batch, no padding at all
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ---- resume
    start = 0
    history: list[dict] = []
    if eval_fn is None and tc.evaluation_strategy != "no" and eval_records and \
            cfg.eval.during_training_metric not in ("eval_loss", "loss"):
        from dsft.eval.during_training import make_eval_fn  # the eval stage's public during-training hook

        eval_fn = make_eval_fn(cfg, eval_records, tok)
    # early stopping follows eval_fn.metric / eval_fn.greater_is_better when the hook declares them
    metric_key = getattr(eval_fn, "metric", "eval_loss") if eval_fn else "eval_loss"
    greater = bool(getattr(eval_fn, "greater_is_better", False)) if eval_fn else False
    best_eval, bad_evals = (-math.inf if greater else math.inf), 0
    train_seconds_before = 0.0
    if resume:
        path = ck.latest_valid(ckpt_root) if resume == "auto" else Path(resume)
        if path is not None and resume != "auto" and (why := ck.verify(path)):
            raise TrainError(f"{path}: cannot resume from this checkpoint: {why}")
        if path is None:
            log.info("dsft train: --resume auto: no checkpoint in %s, starting from step 0", ckpt_root)
        else:
            import json as _json

            st = _json.loads((path / "state.json").read_text(encoding="utf-8"))
            changes = []
            if st["dataset"] != fingerprint:
                changes.append(f"dataset changed (fingerprint {st['dataset']} → {fingerprint})")
            if st["effective_batch"] != effective:
                changes.append(f"effective batch changed ({st['effective_batch']} → {effective})")
            if st.get("method") != tc.method:
                changes.append(f"method changed ({st.get('method')} → {tc.method})")
            if changes and not resume_force:
                raise TrainError(f"{path}: refusing to resume: {'; '.join(changes)} — pass --resume-force to continue anyway")
            try:
                st = ck.load_checkpoint(path, model, opt, names)
            except KeyError as err:
                raise TrainError(str(err).strip("'\"")) from err
            start = st["step"]
            history = st.get("history", [])
            best_eval, bad_evals = st.get("best_eval", best_eval), st.get("bad_evals", 0)
            train_seconds_before = st.get("train_seconds", 0.0)
            if st.get("micro_batch") and st["micro_batch"] < ladder.micro_batch:
                ladder.micro_batch = st["micro_batch"]
            if st.get("gradient_checkpointing") and not ladder.gradient_checkpointing:
                ladder.gradient_checkpointing = True
                enable_checkpointing(model)
            if st.get("offload") and not ladder.offload:
                ladder.offload = True
            log.info("dsft train: resumed from %s (step %d of %d)", path, start, total_steps)

    # DeepSpeed: one deepspeed.initialize for the loss module and AdamW, after a resumed checkpoint went into both
    loss_mod, opt = dist.prepare_optimizer(loss_mod, opt, tc=tc, micro=ladder.micro_batch,
                                           accum=max(1, effective // (ladder.micro_batch * world)))
    monitor = Monitor(stage, tc, start_step=start, history=history, is_main=dist.is_main)
    opt = _with_offload(opt, ladder, monitor, start)
    monitor.log_params({"method": tc.method, "learning_rate": lr, "lora_r": info.get("r"),
                        "lora_alpha": info.get("alpha"), "micro_batch": micro, "effective_batch": effective,
                        "epochs": epochs, "max_steps": total_steps, "lr_scheduler": tc.lr_scheduler,
                        "warmup_ratio": tc.warmup_ratio, "max_seq_length": cfg.data.max_seq_length,
                        "preset": preset.name, "base_model": model_dir.name, "precision": precision,
                        "packing": tc.packing, "examples": len(examples), "world_size": dist.world})
    if dist.is_main:
        _print_setup(info, model_dir, preset, lr, micro, effective, total_steps, len(examples), enc_rep, device,
                     precision, dist)

    bar = tqdm(total=total_steps, initial=start, desc="train", disable=True if not dist.is_main else ((not progress) if progress is not None else None),
               dynamic_ncols=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    tokens_seen = 0
    stopped_early = False
    step = start
    try:
        for step in range(start, total_steps):
            idx = plan.samples(step)
            exs = [examples[i] for i in idx]
            n_lab = sum(e.n_labels for e in exs)
            cur_lr = lr * lr_factor(step, total_steps, warmup, tc.lr_scheduler, tc.cycle_fraction)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            rng = torch.get_rng_state()
            while True:
                try:
                    loss_sum, toks = _accumulate(loss_mod, exs, ladder.micro_batch, n_lab, tc.packing, capacity,
                                                 pad_id, dist, _fwd_context(autocast, ladder, device), scaler,
                                                 fault_hook, step + 1)
                    break
                except torch.OutOfMemoryError:
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if dist.world > 1:  # one rank shrinking its micro-batch alone would break the ranks' lockstep
                        raise TrainError(f"out of memory at step {step + 1} on rank {dist.rank} of {dist.world}: the OOM "
                                         f"ladder works in one process; lower train.per_device_train_batch_size "
                                         f"(gradient accumulation keeps the effective batch), turn on "
                                         f"train.gradient_checkpointing, or use strategy deepspeed / fsdp with "
                                         f"offload: true") from None
                    rung = ladder.next_rung(model) if tc.oom_ladder else None
                    if rung is None:
                        tried = "gradient checkpointing on" + (" and offload on" if ladder.offload else "")
                        raise TrainError(f"out of memory at step {step + 1} with micro-batch {ladder.micro_batch} and "
                                         f"{tried}: use method qlora, a smaller data.max_seq_length, or "
                                         f"--nproc N with strategy deepspeed (zero_stage 3, offload: true)") from None
                    monitor.event(step + 1, "oom", action=rung)
                    opt = _with_offload(opt, ladder, monitor, step + 1)
                    torch.set_rng_state(rng)  # the retried step sees the same dropout masks
            loss = loss_sum / max(1, n_lab)
            if dist.engine is not None:  # DeepSpeed clips (gradient_clipping) and steps inside engine.step
                gn = dist.step() if math.isfinite(loss) else math.nan
            else:
                if scaler is not None:
                    scaler.unscale_(opt)
                gn = dist.clip(trainable, tc.max_grad_norm)
            rec = {"step": step + 1, "loss": loss, "lr": cur_lr, "grad_norm": gn, "tokens": toks,
                   "epoch": round((step + 1) / plan.steps_per_epoch, 4), "micro_batch": ladder.micro_batch}
            monitor.step(rec)  # raises on NaN/inf before the optimizer applies it
            if dist.engine is not None:
                pass  # applied and zeroed by engine.step above
            elif scaler is not None:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
            tokens_seen += toks
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{cur_lr:.2e}")
            done = step + 1
            if eval_fn is not None or (tc.evaluation_strategy != "no" and eval_examples):
                if done % (plan.steps_per_epoch if tc.evaluation_strategy == "epoch" else tc.eval_steps) == 0 or done == total_steps:
                    metrics = eval_fn(model, done) if eval_fn else {"eval_loss": eval_loss(loss_mod, eval_examples, micro, capacity, pad_id, device, tc.packing)}
                    model.train()
                    monitor.eval_record(done, metrics)
                    ev = metrics.get(metric_key)
                    if ev is not None and tc.early_stopping_patience:
                        better = (ev > best_eval + tc.early_stopping_delta) if greater else (ev < best_eval - tc.early_stopping_delta)
                        if better:
                            best_eval, bad_evals = ev, 0
                        else:
                            bad_evals += 1
                            if bad_evals >= tc.early_stopping_patience:
                                monitor.event(done, "early_stop", metric=metric_key, value=ev, best=best_eval,
                                              patience=tc.early_stopping_patience)
                                stopped_early = True
            if done % tc.save_steps == 0 or stopped_early:
                _save(dist, loss_mod, ckpt_root, done, model, opt, names, tc, effective, fingerprint, ladder, monitor,
                      best_eval, bad_evals, train_seconds_before + time.perf_counter() - t_start, total_steps)
                monitor.plot(stage / "loss.png")
            if stopped_early:
                break
    except BaseException as err:  # NaN stop, OOM, Ctrl-C: end MLflow/W&B runs as failed, keep loss.png
        try:
            monitor.plot(stage / "loss.png")
        except Exception:
            pass
        monitor.close(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", png=stage / "loss.png")
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    cpu_elapsed = time.process_time() - cpu_start
    steps_done = step + 1 if total_steps > start else start
    # ---- outputs
    inner = unwrap(model)
    if prev_attn is not None:
        inner.set_attn_implementation(prev_attn)
    adapter_rel = model_rel = None
    full_sd = _gathered_model_state(dist, loss_mod) if dist.kind in ("FSDP", "DEEPSPEED") else None
    if tc.method in ("lora", "dora", "qlora"):
        from dsft.model.adapters import _exact_targets

        if dist.is_main:
            with _exact_targets():
                kw = {"state_dict": full_sd} if full_sd is not None else {}
                model.save_pretrained(str(stage / "adapter"), safe_serialization=True, **kw)
            tok.save_pretrained(str(stage / "adapter"))
        adapter_rel = "adapter"
    else:
        if dist.is_main:
            kw = {"state_dict": full_sd} if full_sd is not None else {}
            inner.save_pretrained(str(stage / "model"), safe_serialization=True, **kw)
            tok.save_pretrained(str(stage / "model"))
        model_rel = "model"
    monitor.plot(stage / "loss.png")
    monitor.close(png=stage / "loss.png")
    losses = monitor.losses()
    window = max(1, min(tc.logging_steps, len(losses)))
    manifest = {
        "base_model": str(model_dir),
        "method": tc.method,
        "adapter": adapter_rel,
        "model": model_rel,
        "steps": steps_done,
        "total_steps": total_steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-window:]) / window if losses else None,
        "loss_last_step": losses[-1] if losses else None,
        "log": "log.jsonl",
        "loss_png": "loss.png",
        "tb": "tb" if "tensorboard" in tc.report_to and not tc.logging_dir else tc.logging_dir,
        "tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed > 0 and tokens_seen else None,
        "train_seconds": round(train_seconds_before + elapsed, 2),
        "loop_seconds": round(elapsed, 3),
        "loop_cpu_seconds": round(cpu_elapsed, 3),
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "learning_rate": lr,
        "epochs": epochs,
        "micro_batch": ladder.micro_batch,
        "effective_batch": effective,
        "preset": preset.name,
        "precision": precision,
        "packing": tc.packing,
        "early_stopped": stopped_early,
        "encode": {"total": enc_rep.total, "kept": enc_rep.kept, "dropped": enc_rep.dropped,
                   "truncated": enc_rep.truncated, "tokens": enc_rep.tokens, "label_tokens": enc_rep.assistant_tokens},
        "dataset_fingerprint": fingerprint,
        "method_info": {k: v for k, v in info.items() if k not in ("trainable_params", "total_params")},
    }
    manifest["processes"] = {"world": dist.world, "kind": dist.kind}
    if dist.cpu_fsdp:
        manifest["processes"]["local_param_fraction"] = dist.local_param_fraction
    if dist.engine is not None:
        manifest["processes"].update(zero_stage=dist.zero_stage, local_optim_fraction=dist.local_optim_fraction)
        if dist.zero_stage == 3:
            manifest["processes"]["local_param_fraction"] = dist.local_param_fraction
    if dist.is_main:
        run.write_manifest("train", manifest)
    dist.barrier()
    dist.end()
    return manifest


def _accumulate(loss_mod, exs: list[Encoded], micro: int, n_lab: int, packing: bool, capacity: int, pad_id: int,
                dist, autocast, scaler, fault_hook, step: int) -> tuple[float, int]:
    """Forward/backward this rank's micro-batches of one step; gradients = d(Σ token CE / n_lab) over all ranks.

    Micro-batches are dealt round-robin to ranks; DDP / ZeRO average gradients over ranks, hence the × world.
    A rank left without a micro-batch (short last step) still joins the gradient sync with a zero loss; under
    FSDP / DeepSpeed, whose every forward/backward is collective, short ranks pad with zero-loss passes so all
    ranks run the same number.
    """
    chunks = split_micro(exs, micro)
    mine = [(c, float(dist.world)) for c in chunks[dist.rank::dist.world]]
    passes = -(-len(chunks) // dist.world) if dist.lockstep else 1
    mine += [(chunks[0], 0.0)] * (passes - len(mine))
    total, toks = 0.0, 0
    for j, (chunk, weight) in enumerate(mine):
        if fault_hook is not None:
            fault_hook(step, micro)
        batch = collate_packed(chunk, capacity, pad_id) if packing else collate_padded(chunk, pad_id)
        with dist.no_sync(loss_mod, sync=j == len(mine) - 1):
            with autocast():
                loss_sum = loss_mod(_to(batch, dist.device))
            scaled = loss_sum * (weight / max(1, n_lab))
            dist.backward(scaler.scale(scaled) if scaler is not None else scaled)
        if weight:
            total += float(loss_sum.detach())
            toks += real_tokens(batch)
    if dist.world > 1:
        total, toks = dist.sum(total, float(toks))
    return total, int(toks)


@torch.no_grad()
def eval_loss(loss_mod, examples: list[Encoded], micro: int, capacity: int, pad_id: int, device, packing: bool) -> float:
    """Mean token loss on held-out examples (dropout off)."""
    model = _inner_loss(loss_mod).model
    model.eval()
    total, n = 0.0, 0
    for chunk in split_micro(examples, micro):
        batch = collate_packed(chunk, capacity, pad_id) if packing else collate_padded(chunk, pad_id)
        total += float(loss_mod(_to(batch, device)))
        n += sum(e.n_labels for e in chunk)
    model.train()
    return total / max(1, n)


def _inner_loss(loss_mod) -> CausalLMLoss:
    m = loss_mod
    while not isinstance(m, CausalLMLoss):
        m = getattr(m, "module", None) or m._orig_mod
    return m


def _gathered_model_state(dist, loss_mod) -> dict:
    """The model's full state dict under FSDP/DeepSpeed (every rank must call this), keys as the model names them."""
    full = dist.full_state(loss_mod)
    return {k.removeprefix("model."): v for k, v in full.items()}


def _save(dist, loss_mod, ckpt_root, done, model, opt, names, tc, effective, fingerprint, ladder, monitor, best_eval,
          bad_evals, train_seconds, total_steps) -> None:
    state = {
        "step": done, "total_steps": total_steps, "effective_batch": effective, "dataset": fingerprint,
        "method": tc.method, "micro_batch": ladder.micro_batch, "gradient_checkpointing": ladder.gradient_checkpointing,
        "offload": ladder.offload,
        "best_eval": best_eval, "bad_evals": bad_evals, "world": dist.world,
        "train_seconds": train_seconds, "history": monitor.history,
        "scheduler": {"kind": tc.lr_scheduler, "step": done, "cycle_fraction": tc.cycle_fraction},
        "data_position": {"next_step": done},
    }
    if dist.engine is not None:  # ZeRO: fp32 master weights and AdamW moments gathered from the partitions
        weights = dist.trainable_weights(model)
        optim = dist.full_optimizer_tensors(opt, names)
    elif dist.kind in ("FSDP", "DEEPSPEED"):  # sharded: gather weights; optimizer moments only for CPU FSDP2
        full = _gathered_model_state(dist, loss_mod)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: t.detach().cpu().contiguous() for n, t in full.items() if n in trainable}
        optim = dist.full_optimizer_tensors(opt, names) if dist.cpu_fsdp else {}
    else:
        weights = ck.trainable_state(model)
        optim = ck.optimizer_tensors(opt, names)
    if dist.is_main:
        ck.save_checkpoint(ckpt_root, done, weights, optim, state, keep=tc.save_total_limit)
    dist.barrier()


def compact_names(names: list[str]) -> list[str]:
    """`model.layers.{0-3}.self_attn.q_a_proj`-style summary of per-layer module names."""
    import re

    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"\.layers\.(\d+)\.", n)
        key = re.sub(r"\.layers\.\d+\.", ".layers.{}.", n) if m else n
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for key, idx in groups.items():
        idx = sorted(i for i in idx if i >= 0)
        if not idx:
            out.append(key)
            continue
        span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
        out.append(key.replace("{}", "{" + span + "}").removeprefix("model."))
    return out


def compact_skips(skipped: dict[str, str]) -> list[tuple[str, str]]:
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    return [(c, why) for why, names in by_reason.items() for c in compact_names(names)]


def _plan_micro_batch(cfg: Config, run: RunDir, model_dir: Path, preset, *, quiet: bool) -> tuple[int, int]:
    """Ask the memory planner before training: print its plan (or, when this run's plan stage already printed it, its
    verdict), warn if it will not fit, and resolve `per_device_train_batch_size: auto` to the largest micro-batch that
    fits, with gradient accumulation keeping the effective batch."""
    from dsft.plan import plan_training

    tc = cfg.train
    lines: list[str] = []
    planned_micro, planned_accum, plan = plan_training(cfg, model_dir, echo=lines.append)
    if plan is not None:
        atomic_write_text(run.root / "train" / "plan.txt", plan.table() + "\n")
    if not quiet:
        if run.has("plan") and plan is not None:
            print(f"dsft train: plan — {plan.verdict()} (train/plan.txt)")
            for line in lines:
                if line.startswith("warning"):
                    print(line)
        else:
            print("\n".join(lines))
    if tc.per_device_train_batch_size == "auto":
        if planned_micro:
            return planned_micro, planned_accum
        return preset.batch, tc.gradient_accumulation_steps
    return tc.per_device_train_batch_size, tc.gradient_accumulation_steps


def _print_setup(info, model_dir, preset, lr, micro, effective, total_steps, n, enc_rep, device, precision, dist) -> None:
    lines = [f"dsft train: {info['method']} on {model_dir.name} ({info['total_params']:,} params, preset {preset.name}), "
             f"{info['trainable_params']:,} trainable ({100 * info['trainable_params'] / max(1, info['total_params']):.2f} %)",
             f"dsft train: {n} examples ({enc_rep.tokens:,} tokens, {enc_rep.truncated} truncated, dropped {enc_rep.dropped}), "
             f"{total_steps} steps, lr {lr:g}, micro-batch {micro}, effective batch {effective}, {device.type} {precision}"
             + (f", {dist.world} processes ({dist.label})" if dist.world > 1 else "")]
    if "targets" in info:
        t = info["targets"]
        lines.append(f"dsft train: LoRA r={info['r']} alpha={info['alpha']} on {t['modules']} modules + "
                     f"{t['expert_parameters']} fused expert parameters {t['by_kind']}; fully trained: {info['modules_to_save']}")
        lines.append("dsft train: adapters on " + ", ".join(compact_names(info["adapted"])))
        if t["skipped"]:
            lines.append("dsft train: not adapted: " + ", ".join(f"{k} ({v})" for k, v in compact_skips(t["skipped"])))
    for line in lines:
        print(line, flush=True)
