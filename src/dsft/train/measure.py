"""Measure the real peak memory of training steps of small models, to validate the planner against.

CPU: torch's CPU allocator reports every allocation and free to the profiler when `profile_memory=True`;
the running sum of those events, from before the model is built to after the last optimizer step, is the
exact number of bytes torch held at each moment, and its maximum is the CPU analogue of
`torch.cuda.max_memory_allocated`. (RSS would add the Python heap, libraries and malloc slack; tracemalloc
does not see torch at all.) On CUDA the same steps are measured with `torch.cuda.max_memory_allocated`.

The `dsft` trainer's steps are the trainer's own: model method (fp32 router, LoRA targets, modules_to_save rule),
hyperparameters, AdamW parameter groups, loss module and optimizer step all come from `dsft.train.setup`, so the
planner cannot be validated against a copy that drifted. The `hf` trainer is a plain PEFT + `model(labels=…)` step.

Run as `python -m dsft.train.measure SPEC.json` to measure in a fresh process; it prints one JSON line per spec.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Small but not trivial shapes: big enough that per-tensor overheads vanish, small enough for a 2-core CPU.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=1024, hidden_size=128, intermediate_size=256,
                        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        n_group=1, topk_group=1, tie_word_embeddings=False),
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=1024, hidden_size=128, intermediate_size=256,
                        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        tie_word_embeddings=False),
}


@dataclass
class Spec:
    """One measured configuration."""

    arch: str  # a key of TINY_SHAPES
    method: str = "lora"
    seq_len: int = 128
    batch: int = 2
    gc: bool = False
    lora_rank: int = 8
    lora_dropout: float = 0.1
    freeze_layers: int = 2
    lora_targets: str = "all"
    trainer: str = "dsft"  # dsft: the step `dsft train` runs; hf: model(labels=…) + AdamW, as HF Trainer does
    label_fraction: float = 0.5
    packed: bool = False  # two samples per row (position ids restart), through transformers' SDPA mask path
    steps: int = 2
    shape: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    fp8: bool = False  # DeepSeek-V3 only: the base as DeepSeek ships it (e4m3 + 128×128 block scales), LoRA on top
    esft: dict[int, list[int]] | None = None  # method esft: the selected routed experts {layer: [ids]}

    @property
    def label(self) -> str:
        return (f"{'hf ' if self.trainer == 'hf' else ''}{self.arch} {self.method}"
                f"{'-attn' if self.lora_targets == 'attention' else ''} seq{self.seq_len} "
                f"b{self.batch}{' gc' if self.gc else ''}"
                + (f" vocab{self.shape['vocab_size']}" if "vocab_size" in self.shape else "")
                + (" p0" if self.method == "lora" and self.lora_dropout == 0 else "")
                + (" bf16" if self.dtype == "bfloat16" else "") + (" packed" if self.packed else "")
                + (" fp8-base" if self.fp8 else "")
                + (f" experts{sum(len(v) for v in self.esft.values())}" if self.esft else ""))

    def hf_config(self) -> dict[str, Any]:
        quant = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}} if self.fp8 else {}
        return {**TINY_SHAPES[self.arch], **self.shape, **quant}


def plan_request(spec: Spec):
    """The PlanRequest that describes a Spec (what the planner is asked)."""
    from dsft.plan.api import GPUS, Gpu, PlanRequest, arch_from_hf_config, cpu_device

    arch = arch_from_hf_config(spec.hf_config(), name=spec.arch)
    gpu = cpu_device() if spec.device == "cpu" else Gpu("cuda", GPUS["H200-141GB"].memory_bytes, 989.0)
    prec = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[spec.dtype]
    esft = {}
    if spec.method == "esft":  # the planner's inputs: experts per layer, and their share of the token-slots (a
        # random router spreads tokens evenly, so the share is the selected fraction of the routed experts)
        esft = {"esft_experts": {int(k): len(v) for k, v in (spec.esft or {}).items()},
                "esft_top_p": sum(len(v) for v in (spec.esft or {}).values()) / max(1, len(spec.esft or {}))
                / arch.n_routed_experts}
    return PlanRequest(arch=arch, method=spec.method, seq_len=spec.seq_len, micro_batch=spec.batch, precision=prec, **esft,
                       gradient_checkpointing=spec.gc, gpu=gpu, lora_rank=spec.lora_rank,
                       lora_dropout=spec.lora_dropout, freeze_layers=spec.freeze_layers, attn="sdpa",
                       lora_targets=spec.lora_targets, trainer=spec.trainer,
                       label_fraction=spec.label_fraction if spec.trainer == "dsft" else 1.0, packing=spec.packed)


def _lora_names(spec: Spec) -> list[str] | str:
    from dsft.plan.api import arch_from_hf_config

    arch = arch_from_hf_config(spec.hf_config())
    names = sorted({lin.name for i in range(arch.layers) for lin in arch.layer_linears(i)})
    if spec.lora_targets == "attention":
        return [n for n in names if n not in ("gate_proj", "up_proj", "down_proj")]
    return names


def dsft_config(spec: Spec):
    """The dsft config whose `train:` / `lora:` sections describe a Spec (what `dsft train` would be given)."""
    from dsft.config import config_from_dict

    prec = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[spec.dtype]
    raw: dict[str, Any] = {
        "train": {"method": spec.method, "gradient_checkpointing": spec.gc, "precision": prec, "packing": True,
                  "report_to": ["none"]}}
    if spec.method == "freeze":
        raw["train"]["freeze_trainable_layers"] = spec.freeze_layers
    if spec.method == "esft":
        raw["esft"] = {"experts": {str(k): v for k, v in (spec.esft or {}).items()}}
    else:
        raw["lora"] = {"r": spec.lora_rank, "dropout": spec.lora_dropout,
                       "target_modules": "auto" if spec.lora_targets == "all" else _lora_names(spec)}
    return config_from_dict(raw)


def _config(spec: Spec):
    from transformers import AutoConfig

    raw = {k: v for k, v in spec.hf_config().items() if k != "quantization_config"}
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def write_fp8_base(spec: Spec, out: Path) -> Path:
    """The spec's model (seeded) written as DeepSeek ships V3: FP8 e4m3 linears + block scales, per-expert tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsft.model.shipped import save_as_shipped

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(spec), dtype=torch.float32)
    return save_as_shipped(model, out)


def _build(spec: Spec, fp8_dir: Path | None = None):
    """The model as the trainer sets it up: `dsft.train.setup` for trainer dsft; plain PEFT for trainer hf.
    fp8_dir: the FP8 base folder (spec.fp8), loaded as `dsft train` loads it (e4m3 kept, dequantized per module)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(spec)
    if fp8_dir is not None:
        from dsft.model.load import load_model

        model = load_model(fp8_dir, dtype=spec.dtype, attn_implementation="sdpa").to(spec.device)
    else:
        with torch.device(spec.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, spec.dtype), attn_implementation="sdpa")
    if spec.trainer == "dsft":
        from dsft.train import setup

        dcfg = dsft_config(spec)
        hp = setup.hyperparameters(dcfg, setup.count_params(model))
        model, _ = setup.apply_method(model, dcfg, hp)
        if spec.gc:
            setup.enable_checkpointing(model)
    else:
        model = _build_hf(spec, model, cfg.num_hidden_layers)
    model.config.use_cache = False
    model.train()
    return model


def _build_hf(spec: Spec, model, n_layers: int):
    """A Hugging Face Trainer-style setup: plain PEFT (which remaps MLP names onto DeepSeek's fused experts)."""
    if spec.method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank,
                                                 lora_dropout=spec.lora_dropout, target_modules=_lora_names(spec),
                                                 use_dora=spec.method == "dora", task_type="CAUSAL_LM"))
    elif spec.method == "freeze":
        keep = {f"layers.{i}." for i in range(n_layers - spec.freeze_layers, n_layers)}
        for name, p in model.named_parameters():
            p.requires_grad_(any(k in name for k in keep) and not name.endswith(".mlp.gate.weight"))
    if spec.gc:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _examples(spec: Spec, g) -> list:
    """Random token ids as `dsft train` examples: the first (1 − label_fraction) of each sample is prompt (no loss);
    packed: two half-length samples per row (position ids restart)."""
    import torch

    from dsft.train.setup import IGNORE, Encoded

    vocab = spec.hf_config()["vocab_size"]
    n, length = (2 * spec.batch, spec.seq_len // 2) if spec.packed else (spec.batch, spec.seq_len)
    ids = torch.randint(0, vocab, (n, length), generator=g).tolist()
    prompt = int(round(length * (1 - spec.label_fraction)))
    return [Encoded(row, [IGNORE] * (prompt + 1) + row[prompt + 1:]) for row in ids]


def _steps(spec: Spec, model) -> float:
    """`spec.steps` optimizer steps; the last step's loss."""
    import torch

    g = torch.Generator().manual_seed(0)
    if spec.trainer == "dsft":  # the trainer's own loss module, AdamW, autocast and step
        from dsft.train import setup

        dcfg = dsft_config(spec)
        opt, _ = setup.make_optimizer(model, dcfg, setup.hyperparameters(dcfg, setup.count_params(model)))
        loss_mod = setup.build_loss(model, dcfg.train.loss_chunk_size)
        dist = setup.single_process(spec.device)
        autocast = setup.autocast_for(setup.resolve_precision(dcfg.train.precision, dist.device), dist.device)
        loss = 0.0
        for _ in range(spec.steps):
            exs = _examples(spec, g)
            loss = setup.training_step(loss_mod, opt, exs, dist=dist, micro=len(exs), packing=True,
                                       capacity=spec.seq_len, pad_id=0, max_grad_norm=dcfg.train.max_grad_norm,
                                       autocast=autocast)
        return float(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    # the HF Trainer's default: fused AdamW on CUDA, the per-tensor loop on CPU
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if spec.device == "cuda" else None)
    vocab = spec.hf_config()["vocab_size"]
    loss = torch.tensor(0.0)
    for _ in range(spec.steps):
        ids = torch.randint(0, vocab, (spec.batch, spec.seq_len), generator=g).to(spec.device)
        loss = model(input_ids=ids, labels=ids).loss  # the output (and its logits) is dropped, as Trainer does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss)


def measure(spec: Spec) -> dict[str, Any]:
    """Peak bytes torch held during model build + `steps` optimizer steps of this spec."""
    if spec.fp8:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return _measure(spec, write_fp8_base(spec, Path(tmp) / "fp8"))
    return _measure(spec)


def _measure(spec: Spec, fp8_dir: Path | None = None) -> dict[str, Any]:
    import torch

    from dsft.train.setup import release_buffers

    torch.manual_seed(0)
    release_buffers()
    gc.collect()
    if spec.device == "cpu":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            model = _build(spec, fp8_dir)
            loss = _steps(spec, model)
            del model
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort()
        cur = peak = 0
        for _, nbytes in events:
            cur += nbytes
            peak = max(peak, cur)
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = _build(spec, fp8_dir)
        loss = _steps(spec, model)
        peak = torch.cuda.max_memory_allocated() - base
        del model
        torch.cuda.empty_cache()
    return {"label": spec.label, "measured": int(peak), "loss": loss}


def compare(spec: Spec, measured: int) -> dict[str, Any]:
    from dsft.plan.api import estimate

    est = estimate(plan_request(spec))
    predicted = est.allocated
    return {"config": spec.label, "estimated": int(predicted), "measured": int(measured),
            "error_pct": 100.0 * (predicted - measured) / measured, "phase": est.phase}


def measure_in_subprocess(specs: list[Spec], timeout: float = 600) -> list[dict[str, Any]]:
    """Measure specs in one fresh Python process (sequentially) and return their results."""
    from dataclasses import asdict

    src = str(Path(__file__).resolve().parents[2])
    env_path = {"PYTHONPATH": src}
    import os

    env = {**os.environ, **env_path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    payload = json.dumps([asdict(s) for s in specs])
    r = subprocess.run([sys.executable, "-m", "dsft.train.measure", "-"], input=payload, capture_output=True,
                       text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = sys.stdin.read() if not argv or argv[0] == "-" else Path(argv[0]).read_text(encoding="utf-8")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    for raw in json.loads(text):
        print(json.dumps(measure(Spec(**raw))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


_SMALL_VOCAB = {"vocab_size": 128}  # activations, not logits, set the peak
_MANY_EXPERTS = {**_SMALL_VOCAB, "n_routed_experts": 16, "moe_intermediate_size": 128}  # routed experts dominate
_ESFT_SHAPE = {**_SMALL_VOCAB, "n_routed_experts": 8, "moe_intermediate_size": 128}


def validation_specs() -> list[Spec]:
    """The CPU validation matrix: Llama, Qwen2 (GQA), DeepSeek-V3 and -V2 (MLA + MoE) × lora/full/freeze ×
    seq 64/128/256 × batch 1/2/4 × with/without gradient checkpointing, as `dsft train` runs them (plus two
    HF-Trainer-style steps, LoRA/DoRA on an FP8 DeepSeek-V3 base, and ESFT); peaks land in the loss, in a layer's
    backward and in the optimizer step."""
    return [
        Spec("llama", "lora", 128, 2),
        Spec("llama", "full", 64, 1),
        Spec("llama", "lora", 256, 4, gc=True),
        Spec("llama", "full", 256, 4, shape=_SMALL_VOCAB),
        Spec("qwen2", "lora", 128, 4),
        Spec("qwen2", "full", 256, 4),
        Spec("qwen2", "lora", 256, 2, gc=True),
        Spec("qwen2", "freeze", 256, 4, shape=_SMALL_VOCAB),
        Spec("deepseek_v3", "lora", 128, 2),
        Spec("deepseek_v3", "full", 128, 2),
        Spec("deepseek_v3", "lora", 256, 4, gc=True, lora_targets="attention"),
        Spec("deepseek_v3", "freeze", 256, 4),
        Spec("deepseek_v3", "full", 256, 4, gc=True, shape=_SMALL_VOCAB),
        Spec("deepseek_v3", "lora", 256, 4, shape=_SMALL_VOCAB),
        Spec("deepseek_v2", "lora", 256, 4, gc=True, shape=_SMALL_VOCAB),
        Spec("llama", "lora", 256, 4, shape=_SMALL_VOCAB, packed=True),  # SDPA's per-layer packed-mask bias
        Spec("llama", "lora", 128, 2, trainer="hf"),
        Spec("deepseek_v3", "lora", 128, 2, trainer="hf", lora_dropout=0.0),
        # 16-bit under autocast, as dsft train runs bf16 (fp32 norm upcasts, PEFT's fp32 adapter casts)
        Spec("qwen2", "lora", 128, 2, gc=True, shape=_SMALL_VOCAB, dtype="bfloat16"),
        Spec("deepseek_v3", "full", 128, 2, shape=_SMALL_VOCAB, dtype="bfloat16"),
        # DeepSeek-V3 as shipped (FP8 blocks): LoRA/DoRA on every routed expert's own projections, no fused W + ΔW
        Spec("deepseek_v3", "lora", 256, 4, shape=_MANY_EXPERTS, lora_dropout=0.0, fp8=True),
        Spec("deepseek_v3", "lora", 256, 2, shape=_MANY_EXPERTS, dtype="bfloat16", fp8=True),
        Spec("deepseek_v3", "dora", 128, 2, shape=_MANY_EXPERTS, fp8=True),  # dropout: fp8_dora.py's base term
        # ESFT: only the selected routed experts train (split-out copies); layers before the first one keep nothing
        Spec("deepseek_v3", "esft", 128, 2, esft={1: [0, 3], 2: [1], 3: [2, 5]}, shape=_ESFT_SHAPE),
        Spec("deepseek_v3", "esft", 256, 4, gc=True, esft={1: [0], 2: [1], 3: [6]}, shape=_ESFT_SHAPE),
        Spec("deepseek_v2", "esft", 256, 2, esft={2: [0, 1], 3: [3]}, shape=_ESFT_SHAPE, dtype="bfloat16"),
    ]
