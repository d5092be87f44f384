"""The memory model: per-GPU peak of one training step, from the tensors autograd keeps alive, phase by phase.

The model walks one optimizer step the way PyTorch allocates it: weights (+ optimizer state from the previous
step) are resident; the forward pass stacks up the tensors autograd saves for backward, layer by layer; the
loss adds the logits and the fp32 log-softmax; the backward pass frees each layer's saved tensors while the
gradients of its parameters appear; the optimizer step adds its temporaries. The peak is the largest sum over
those moments. Saved tensors are counted per layer from the Hugging Face implementations (RMSNorm, rotary
embedding, SDPA attention, SwiGLU MLP, DeepSeek MLA and MoE), with PEFT's LoRA branch (dropout copies, masks,
rank-r activations) when the base is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dsft.errors import ConfigError
from dsft.plan.hardware import GiB, Gpu, cpu_device
from dsft.plan.models import Arch
from dsft.report.numbers import fmt_count

METHODS = ("lora", "qlora", "dora", "full", "freeze")
PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd")
SHARDING = ("none", "zero1", "zero2", "zero3", "fsdp")

CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
FRAGMENTATION = 0.05  # caching-allocator slack on top of max_memory_allocated
QLORA_BYTES = 0.5 + 0.127 / 8  # NF4 + double-quantized absmax, bytes per quantized weight


@dataclass
class PlanRequest:
    """Everything the planner needs about one training setup."""

    arch: Arch
    method: str = "lora"
    seq_len: int = 512
    micro_batch: int = 1
    grad_accum: int = 1
    precision: str = "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    packing: bool = True
    sharding: str = "none"
    cpu_offload: bool = False
    num_gpus: int = 1
    gpu: Gpu = field(default_factory=cpu_device)
    lora_rank: int | None = None
    lora_dropout: float = 0.1
    lora_targets: str | list[str] = "all"
    freeze_layers: int = 2
    attn: str = "sdpa"
    mfu: float = 0.35
    hold_logits: bool = False
    """True when the training loop keeps the model output (logits) alive through backward (hf trainer)."""
    trainer: str = "dsft"
    """dsft: `dsft train` (logits only on labelled tokens in chunks, foreach AdamW, dsft's LoRA targets);
    hf: a Hugging Face Trainer-style step (logits for every token, fused AdamW on CUDA, PEFT's own targets)."""
    label_fraction: float = 1.0
    """Share of tokens that carry a loss target (dsft trainer: assistant tokens); 1.0 is the safe bound."""
    loss_chunk: int = 4096
    modules_to_save: bool | None = None
    """Embeddings, LM head and norms trained fully next to LoRA; None: dsft's rule (tiny models < 100 M)."""

    def validate(self) -> PlanRequest:
        def bad(key: str, value: Any, accepted: str) -> ConfigError:
            return ConfigError(f"{key} {value!r}: expected {accepted}")

        if self.method not in METHODS:
            raise bad("method", self.method, "one of " + ", ".join(METHODS))
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, "one of " + ", ".join(PRECISIONS))
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, "one of " + ", ".join(OPTIMIZERS))
        if self.sharding not in SHARDING:
            raise bad("sharding", self.sharding, "one of " + ", ".join(SHARDING))
        for key in ("seq_len", "micro_batch", "grad_accum", "num_gpus", "freeze_layers"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise bad(key.replace("_", "-"), v, "a positive integer")
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise bad("lora-rank", self.lora_rank, "a positive integer")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora-dropout", self.lora_dropout, "a number in [0, 1)")
        if not 0 < self.mfu <= 1:
            raise bad("mfu", self.mfu, "a fraction in (0, 1]")
        if not (isinstance(self.lora_targets, str) and self.lora_targets in ("all", "auto", "all-linear", "attention", "attn")):
            known = {lin.name for i in range(self.arch.layers) for lin in self.arch.layer_linears(i)}
            unknown = sorted(_target_names(self) - known)
            if unknown or not _target_names(self):
                raise bad("lora-targets", ",".join(unknown) or self.lora_targets,
                          "all, attention, or names among " + ", ".join(sorted(known)))
        if self.trainer not in ("dsft", "hf"):
            raise bad("trainer", self.trainer, "dsft or hf")
        if not 0 < self.label_fraction <= 1:
            raise bad("label-fraction", self.label_fraction, "a fraction in (0, 1]")
        if self.attn not in ("sdpa", "eager", "flash_attention_2", "dsft_packed"):
            raise bad("attn", self.attn, "sdpa, eager, flash_attention_2 or dsft_packed")
        return self

    @property
    def rank(self) -> int:
        if self.lora_rank:
            return self.lora_rank
        from dsft.plan.recommend import recommend

        return recommend(self.arch).lora_rank

    @property
    def adapter(self) -> bool:
        return self.method in ("lora", "qlora", "dora")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def mts(self) -> bool:
        """Whether embeddings, LM head and norms train fully next to the adapter (dsft: tiny models)."""
        if not self.adapter:
            return False
        if self.modules_to_save is not None:
            return self.modules_to_save
        return self.trainer == "dsft" and self.arch.total_params() < 100e6


@dataclass
class Estimate:
    """Per-GPU peak memory, broken down at the moment of the peak (bytes)."""

    weights: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    phase: str
    pageable: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> float:
        """What torch's allocator holds at the peak (compare with torch.cuda.max_memory_allocated)."""
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def peak(self) -> float:
        return self.allocated + self.overhead

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights, "adapter": self.adapter, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "logits_loss": self.logits,
                "overhead": self.overhead}


# ---- bytes per element -----------------------------------------------------------------------------------------
def _act_bytes(req: PlanRequest) -> int:
    return 4 if req.precision == "fp32" else 2


def _weight_bytes(req: PlanRequest) -> int:
    """Bytes per stored base weight (fp32 master weights under AMP)."""
    return 4 if req.precision in ("fp32", "amp-bf16", "amp-fp16") else 2


def _shards(req: PlanRequest) -> tuple[int, int, int]:
    """Divisors for (optimizer state, gradients, parameters) per GPU under ZeRO / FSDP."""
    n = req.num_gpus
    s = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[req.sharding]
    return (n if s >= 1 else 1, n if s >= 2 else 1, n if s >= 3 else 1)


# ---- parameters ------------------------------------------------------------------------------------------------
MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj"})


def _target_names(req: PlanRequest) -> set[str]:
    names = {lin.name for i in range(req.arch.layers) for lin in req.arch.layer_linears(i)}
    t = req.lora_targets
    if t in ("all", "auto", "all-linear"):
        return names
    if t in ("attention", "attn"):
        return names - MLP_NAMES
    if isinstance(t, str):
        t = [x.strip() for x in t.split(",") if x.strip()]
    return {n.rsplit(".", 1)[-1] for n in t}


def fused_expert_lora(req: PlanRequest) -> bool:
    """Whether the fused 3-D routed-expert parameters of a DeepSeek-V2/V3 model (transformers 5) carry LoRA.

    dsft: its adapters module targets them explicitly next to every nn.Linear (not with DoRA).
    hf: PEFT itself remaps the MLP target names onto them, and the dense MLPs / shared experts get no LoRA.
    """
    if not (req.adapter and req.arch.moe and req.arch.family.startswith("deepseek")):
        return False
    if not _target_names(req) & MLP_NAMES:
        return False
    return not (req.trainer == "dsft" and req.method == "dora")


def _targets(req: PlanRequest, i: int) -> list:
    names = _target_names(req)
    peft_remap = fused_expert_lora(req) and req.trainer == "hf"
    return [lin for lin in req.arch.layer_linears(i)
            if lin.lora and lin.name in names and not (peft_remap and lin.group in ("mlp", "shared"))]


def _fused_expert_adapter(req: PlanRequest) -> int:
    """LoRA params of one MoE layer's fused experts, rank r per expert (PEFT's remap doubles gate_up's rank)."""
    a, r, e = req.arch, req.rank, req.arch.n_routed_experts
    gate_up = (2 if req.trainer == "hf" else 1) * r * e * (a.hidden + 2 * a.moe_intermediate)
    return gate_up + r * e * (a.moe_intermediate + a.hidden)


def _mts_params(req: PlanRequest) -> int:
    """Parameters of the modules trained fully next to LoRA (embeddings, LM head, norms)."""
    a = req.arch
    norms = a.hidden * (2 * a.layers + 1) + a.layers * a.attn_norm_params()
    return a.embed_params + a.head_params + norms


def _layer_adapter(req: PlanRequest, i: int) -> int:
    r = req.rank
    n = sum(r * (lin.d_in + lin.d_out) + (lin.d_out if req.method == "dora" else 0) for lin in _targets(req, i))
    if fused_expert_lora(req) and req.arch.is_moe_layer(i):
        n += _fused_expert_adapter(req)
    return n


def adapter_params(req: PlanRequest) -> int:
    return sum(_layer_adapter(req, i) for i in range(req.arch.layers)) + (_mts_params(req) if req.mts else 0)


def packed_mask(req: PlanRequest) -> bool:
    """Packed rows through transformers' SDPA path get a (B,1,S,S) block-diagonal mask, which every layer's
    attention converts to a float bias and saves for backward (flash_attention_2 / dsft's CPU path avoid it)."""
    return req.packing and req.attn == "sdpa"


def _freeze_first(req: PlanRequest) -> int:
    """Index of the first trainable layer under `freeze` (the last N layers train)."""
    return max(req.arch.layers - req.freeze_layers, 0)


def trainable_params(req: PlanRequest) -> int:
    a = req.arch
    if req.adapter:
        return adapter_params(req)
    if req.method == "freeze":
        return sum(a.layer_params(i) for i in range(_freeze_first(req), a.layers))
    return a.total_params()


def _weights_bytes(req: PlanRequest) -> float:
    a = req.arch
    wb = _weight_bytes(req)
    if req.method == "qlora":
        lin = sum(lin.params for i in range(a.layers) for lin in a.layer_linears(i))
        experts = sum(a.n_routed_experts * a.expert_params() for i in range(a.layers) if a.is_moe_layer(i))
        rest = a.total_params() - lin - experts
        # prepare_model_for_kbit_training upcasts what is not quantized (embeddings, LM head, norms) to fp32
        return (lin + experts) * QLORA_BYTES + rest * 4
    return a.total_params() * wb


# ---- activations -----------------------------------------------------------------------------------------------
def _layer_bytes(req: PlanRequest, i: int, mode: str, input_grad: bool = True) -> tuple[float, float, float]:
    """Bytes per token of layer i: (saved for backward, transient in its backward) and bytes per layer that do
    not scale with tokens (PEFT's W+ΔW of fused experts, kept for backward).

    mode: "full" (weights train), "lora" (frozen base + adapters), "frozen-input" is expressed by input_grad=False:
    the layer input does not require grad (first layer under LoRA / freeze, fed by a frozen embedding), so the
    first norm and the first dropouts save nothing.
    """
    a = req.arch
    h = a.hidden
    ab = _act_bytes(req)
    f32 = 4.0
    # CUDA's fused dropout keeps a bool mask (1 byte); the CPU path keeps a full-precision noise tensor
    mask = 1.0 if req.gpu.cuda else f32  # (LoRA inputs are fp32: PEFT's adapters are fp32)
    full = mode == "full"
    lora = mode == "lora"
    norm_w = full or (lora and req.mts)  # the norms' weights train (full, or LoRA with modules_to_save)
    p = req.lora_dropout if lora else 0.0
    tset = {lin.name for lin in _targets(req, i)} if lora else set()
    r = req.rank if lora else 0
    fused = lora and fused_expert_lora(req) and a.is_moe_layer(i)

    # PEFT keeps adapters in fp32 and casts each LoRA input to fp32 first (a separate copy per module when the
    # base computes in 16-bit); dropout then copies it again and keeps a mask. Under autocast (dsft train in
    # 16-bit) the adapter matmuls run in 16-bit, so what lora_A keeps is a 16-bit cast of that copy.
    cast = ab != f32
    li = ab if (cast and req.trainer == "dsft") else f32

    def lin_in(name: str, width: int, already_saved: bool, grad_in: bool = True) -> float:
        """Bytes a linear keeps of its input: full → the input; LoRA → a dropout copy + mask (or the input)."""
        if full:
            return 0.0 if already_saved else width * ab
        if name in tset:
            if p > 0:
                return width * li + (width * mask if grad_in else 0.0) + r * li
            return r * li + (width * li if cast else (0.0 if already_saved else width * ab))
        return 0.0

    def lin_group(names: list[str], width: int, grad_in: bool = True) -> float:
        """Several linears reading the same input (q/k/v, gate/up)."""
        if full:
            return width * ab
        ts = [n for n in names if n in tset]
        if not ts:
            return 0.0
        if p > 0:
            return len(ts) * (width * li + (width * mask if grad_in else 0.0) + r * li)
        if cast:
            return len(ts) * (width * li + r * li)
        return width * ab + len(ts) * r * f32

    def norm(width: int, grad_in: bool) -> float:
        """RMSNorm upcasts to fp32 and keeps that input and rsqrt (when the input needs grad), and the normalized
        value cast back (when the weight trains)."""
        return (width * f32 + f32 if grad_in else 0.0) + (width * ab if norm_w else 0.0)

    s = norm(h, input_grad)
    if a.mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        qa = a.q_lora_rank or 0
        first = ["q_a_proj", "kv_a_proj_with_mqa"] if qa else ["q_proj", "kv_a_proj_with_mqa"]
        s += lin_group(first, h, input_grad)
        if qa:
            s += norm(qa, True) + lin_in("q_b_proj", qa, False)  # q_a out kept by q_a_layernorm
        kvr = a.kv_lora_rank + a.qk_rope_head_dim
        # kv_a out (its split view is upcast for kv_a_layernorm; in fp32 the view keeps all of kv_a out alive)
        s += (kvr * ab if ab == 4 else a.kv_lora_rank * f32) + f32 + (a.kv_lora_rank * ab if norm_w else 0.0)
        s += lin_in("kv_b_proj", a.kv_lora_rank, False)
        s += 2 * a.heads * qk * ab  # query_states (cat) and key_states (new_empty + copy) kept by attention
        s += a.heads * (a.qk_nope_head_dim + a.v_head_dim) * ab  # kv_b out, alive through the value view
        s += a.o_dim * ab + a.heads * f32  # attention output + logsumexp
        s += lin_in("o_proj", a.o_dim, False)  # the (B,H,S,D) output is copied to (B,S,H·D) for o_proj
    else:
        s += lin_group(["q_proj", "k_proj", "v_proj"], h, input_grad)
        packed = req.attn == "dsft_packed"  # dsft's CPU packed path: SDPA per sample, outputs concatenated
        gqa_repeat = a.kv_heads != a.heads and req.attn in ("eager", "dsft_packed")
        kv = a.q_dim if gqa_repeat else a.kv_heads * a.hd
        s += (a.q_dim + 2 * kv) * ab  # rotated q, k and v kept by attention
        s += a.q_dim * ab + a.heads * f32  # attention output (already (B,S,H,D)) + logsumexp
        s += lin_in("o_proj", a.o_dim, not packed)  # the packed path's output is a fresh (B,S,H·D) copy
    if req.attn == "eager":
        s += a.heads * req.seq_len * 2 * ab  # softmax probabilities (+ the scores they came from)
    if packed_mask(req):
        s += req.seq_len * ab  # SDPA turns the packed block-diagonal bool mask into a float bias and keeps it
    s += norm(h, True)  # residual after attention, kept by the second norm
    per_layer = 0.0
    if a.is_moe_layer(i):
        k = a.experts_per_token
        mi = a.moe_intermediate
        w = mi * a.n_shared_experts
        if w:
            s += lin_group(["gate_proj", "up_proj"], h)
            s += 3 * w * ab + lin_in("down_proj", w, False)  # gate (silu input), silu out, up; product for down
        if full:
            s += 0.0 if w else h * ab  # the router's fp32 input when nothing else keeps the normed input
        # router (fp32): sigmoid scores, group/top-k indices, normalised weights
        s += a.n_routed_experts * (f32 + 1) + k * (8 + 2 * f32) + 8 * 2 + f32
        s += k * 3 * 8  # sort permutation, gather index, inverse permutation (int64)
        experts_train = full or fused
        s += k * (2 * mi + mi + h) * ab + k * f32  # gate_up out, silu out, down out (kept to apply routing weights)
        if experts_train:
            s += k * (h + mi) * ab  # gathered inputs and products, kept for the expert weights' gradients
        if fused:
            per_layer = a.n_routed_experts * a.expert_params() * ab  # PEFT's W + ΔW, kept for backward
        bwd = (2 * h + 2 * k * mi + 2 * w) * ab
    else:
        it = a.intermediate
        s += lin_group(["gate_proj", "up_proj"], h)
        s += 3 * it * ab + lin_in("down_proj", it, False)
        bwd = (2 * h + 2 * it) * ab  # gradients of the MLP's inputs while its saved tensors are released
    if lora and req.method == "dora":
        # DoRA rescales the base output and the LoRA output by the magnitude: both (fp32) are kept for backward
        s += sum(2 * lin.d_out * f32 for lin in _targets(req, i))
    return s, bwd, per_layer


def _layer_mode(req: PlanRequest, i: int) -> str:
    if req.method == "full":
        return "full"
    if req.method == "freeze":
        return "full" if i >= _freeze_first(req) else "none"
    return "lora"


@dataclass
class _Acts:
    saved: list[float]  # bytes per layer kept through the forward pass
    recompute: list[float]  # bytes of one layer's saved tensors when recomputed (checkpointing)
    bwd_temp: list[float]
    final: float  # final norm (+ lm_head input)


def _activations(req: PlanRequest) -> _Acts:
    a = req.arch
    ab = _act_bytes(req)
    tok = req.tokens
    saved, rec, bwd = [], [], []
    for i in range(a.layers):
        mode = _layer_mode(req, i)
        if mode == "none":
            saved.append(0.0)
            rec.append(0.0)
            bwd.append(0.0)
            continue
        # dsft's checkpointing makes the embedding output require grad (enable_input_require_grads)
        emb_grad = req.mts or (req.gradient_checkpointing and req.adapter and req.trainer == "dsft")
        first_trainable = (i == 0 and req.method != "full" and not emb_grad) or (
            req.method == "freeze" and i == _freeze_first(req))
        per_tok, tmp, per_layer = _layer_bytes(req, i, mode, input_grad=not first_trainable)
        full_layer = per_tok * tok + per_layer
        if req.gradient_checkpointing:
            saved.append(a.hidden * tok * ab + (tok * req.seq_len if packed_mask(req) and i == 0 else 0.0))
            rec.append(full_layer)
        else:
            saved.append(full_layer)
            rec.append(0.0)
        bwd.append(tmp * tok)
    head_trains = req.method == "full" or req.mts
    trains_any = req.method != "freeze" or req.freeze_layers > 0
    # final norm: fp32 input + rsqrt (+ normalized when it trains, + its output kept by a training head (hf))
    final = a.hidden * 4 + 4
    if head_trains:
        final += a.hidden * ab + (a.hidden * ab if req.trainer == "hf" else 0.0)
    final = final * tok if trains_any else 0.0
    return _Acts(saved, rec, bwd, final)


def _logits_phases(req: PlanRequest) -> tuple[float, float]:
    """(forward peak, backward peak) bytes of logits + loss: lm_head out, fp32 log-softmax, their gradients."""
    a = req.arch
    ab = _act_bytes(req)
    if req.trainer == "dsft":
        # dsft: hidden states of labelled tokens gathered, logits in chunks, each chunk's fp32 log-softmax kept
        sel = req.tokens * req.label_fraction
        c = min(req.loss_chunk, sel)
        gathered = sel * a.hidden * ab
        fwd = gathered + sel * a.vocab * 4 + c * a.vocab * (ab + (4 if ab != 4 else 0))
        bwd = gathered + sel * a.vocab * 4 + 2 * c * a.vocab * 4
        return fwd, bwd
    n = req.tokens * a.vocab
    logits = n * ab
    upcast = n * 4 if ab != 4 else 0
    fwd = logits + upcast + n * 4  # logits, fp32 copy, log-softmax output
    held = logits if req.hold_logits else 0.0
    bwd = held + 3 * n * 4  # log-probs, nll grad, softmax grad (the cast back to 16-bit comes after they go)
    return fwd, bwd


# ---- the timeline ----------------------------------------------------------------------------------------------
def estimate(req: PlanRequest) -> Estimate:
    """Per-GPU peak memory of one steady-state optimizer step (after step 1 created the optimizer state)."""
    req.validate()
    a = req.arch
    opt_div, grad_div, par_div = _shards(req)
    wb = _weight_bytes(req)
    notes: list[str] = []

    base = _weights_bytes(req)
    train_n = trainable_params(req)
    if req.adapter:
        mts_n = _mts_params(req) if req.mts else 0
        # PEFT keeps adapter weights in fp32; modules_to_save are trainable copies in the weights' dtype
        adapter = ((train_n - mts_n) * 4.0 + mts_n * wb) / par_div
        weights = base / par_div
        param_bytes = 4
    else:
        adapter = 0.0
        weights = base / par_div
        param_bytes = wb


    # optimizer state (AdamW moments in the trainable parameters' dtype; 8-bit: 1 byte each + block scales)
    if req.optimizer == "sgd":
        opt = 0.0
    elif req.optimizer.endswith("8bit"):
        opt = train_n * 2 * (1 + 4 / 2048)
    else:
        opt = train_n * 2 * param_bytes
    opt /= opt_div
    pageable = 0.0
    offload_grads = 1.0
    if req.cpu_offload:
        opt = 0.0
        if req.sharding in ("zero3", "fsdp"):
            weights = 0.0  # parameters live on CPU; only the gathered ones are on the GPU (added below)
            notes.append("CPU offload: optimizer state, fp32 master weights and parameters live in host memory")
        else:
            if wb == 4 and not req.adapter:
                weights = base / 2  # the 16-bit working copy stays; fp32 masters go to the CPU optimizer
            notes.append("CPU offload: optimizer state and fp32 master weights live in host memory")
        # gradients stream to the CPU through ~1 GiB of reduce buckets
        total_grads = train_n * param_bytes / grad_div
        offload_grads = min(1.0, GiB / total_grads) if total_grads else 1.0
    if req.optimizer.startswith("paged"):
        pageable = opt
        notes.append("paged optimizer: its state can spill to CPU memory under pressure")

    # temporaries of the optimizer step: per-tensor on CPU, multi-tensor (foreach) on CUDA
    largest = max([a.embed_params, a.head_params] + [lin.params for lin in a.layer_linears(0)]) if not req.adapter else 0
    if req.optimizer == "sgd" or req.cpu_offload:
        step_tmp = 0.0
    elif req.trainer == "dsft":
        step_tmp = train_n * param_bytes / opt_div  # foreach AdamW: one √v temporary for every parameter at once
    elif req.gpu.cuda:
        step_tmp = 0.0  # fused AdamW (the HF Trainer's default on CUDA) updates in place
    else:
        step_tmp = (largest if not req.adapter else 0) * param_bytes * 2
    if req.sharding in ("zero3", "fsdp") and (req.num_gpus > 1 or req.cpu_offload):
        gb = 2 if wb == 4 else (wb if req.method != "qlora" else QLORA_BYTES)
        if req.sharding == "fsdp":  # one decoder layer per FSDP unit, the next one prefetched
            live = 2 * max(a.layer_params(i) for i in range(a.layers))
            notes.append("FSDP: two decoder layers' parameters gathered at a time")
        else:  # DeepSpeed: up to stage3_max_live_parameters (1e9) elements, whole tensors
            largest_tensor = max(a.embed_params, a.n_routed_experts * 2 * a.moe_intermediate * a.hidden,
                                 max(lin.params for i in range(a.layers) for lin in a.layer_linears(i)))
            live = min(max(largest_tensor, 1e9), a.total_params())
            notes.append(f"ZeRO-3: up to {fmt_count(live)} parameters gathered at a time")
        weights += live * gb

    acts = _activations(req)
    lfwd, lbwd = _logits_phases(req)
    static = weights + adapter + opt

    # gradients per layer in backward order (full: every parameter; adapters: their weights)
    layer_grad = []
    for i in range(a.layers):
        if req.adapter:
            g = _layer_adapter(req, i) * 4.0
        elif req.method == "full" or i >= _freeze_first(req):
            g = a.layer_params(i) * param_bytes
        else:
            g = 0.0
        layer_grad.append(g / grad_div * offload_grads)
    he = req.method == "full" or req.mts
    hb = param_bytes if req.method == "full" else wb
    head_grad = (a.head_params if he else 0) * hb / grad_div * offload_grads
    embed_grad = (a.embed_params if he else 0) * hb / grad_div * offload_grads
    if he and a.tie_embeddings:
        head_grad = a.embed_params * hb / grad_div * offload_grads
        embed_grad = 0.0

    ab = _act_bytes(req)
    hid = req.tokens * a.hidden * ab
    # per-layer temporaries that do not scale with tokens: QLoRA dequantises one weight at a time to 16-bit;
    # DoRA builds W + s·BA (fp32) of a module to take its norm
    biggest = max(lin.params for i in range(a.layers) for lin in a.layer_linears(i))
    layer_tmp = 0.0
    if req.method == "qlora":
        layer_tmp += biggest * 2
    if req.method == "dora":
        layer_tmp += max((lin.params for i in range(a.layers) for lin in _targets(req, i)), default=0) * 4
    # recomputing a checkpointed layer in 16-bit: PEFT's fp32 cast of the widest adapted input (and, under
    # autocast, its fp32 dropout copy) exist for a moment on top of the rebuilt layer
    recompute_tmp = 0.0
    if req.adapter and ab != 4:
        widest = max((lin.d_in for i in range(a.layers) for lin in _targets(req, i)), default=0)
        copies = 2 if (req.trainer == "dsft" and req.lora_dropout > 0) else 1
        recompute_tmp = widest * 4 * copies * req.tokens
    saved_total = sum(acts.saved) + acts.final
    candidates: list[tuple[float, str, float, float, float]] = []  # (total, phase, acts, logits, grads)
    # 1) end of forward, loss computed
    candidates.append((static + saved_total + lfwd, "forward (loss)", saved_total, lfwd, 0.0))
    # 2) backward through the loss / lm_head
    candidates.append((static + saved_total + lbwd + head_grad + hid, "backward (loss)", saved_total + hid, lbwd, head_grad))
    # 3) backward through each layer, top down
    grads = head_grad
    live = saved_total
    for i in reversed(range(a.layers)):
        grads += layer_grad[i]
        # checkpointing: the peak is the recomputed layer (+ incoming gradient); else the layer's gradient buffers
        work = acts.recompute[i] + 3 * hid + recompute_tmp if req.gradient_checkpointing else acts.bwd_temp[i]
        work += layer_tmp
        candidates.append((static + live + work + grads, f"backward (layer {i})", live + work, 0.0, grads))
        live -= acts.saved[i]
    grads += embed_grad
    # 4) optimizer step: all gradients + temporaries
    candidates.append((static + grads + step_tmp, "optimizer step", 0.0, 0.0, grads))
    total, phase, act_b, log_b, grad_b = max(candidates, key=lambda c: c[0])
    opt_b = opt + (step_tmp if phase == "optimizer step" else 0.0)

    alloc = weights + adapter + grad_b + opt_b + act_b + log_b
    overhead = (CUDA_CONTEXT + FRAGMENTATION * alloc) if req.gpu.cuda else 0.0
    if req.attn == "eager":
        notes.append("eager attention keeps the S×S score matrix per head")
    if packed_mask(req) and req.seq_len >= 2048:
        m = a.layers * req.tokens * req.seq_len * _act_bytes(req)
        notes.append(f"packing through SDPA keeps an S×S float mask per layer ({m / GiB:.1f} GiB); "
                     f"attn_implementation flash_attention_2 (varlen) avoids it")
    if fused_expert_lora(req):
        a_ = req.arch
        copy = a_.n_moe_layers * a_.n_routed_experts * a_.expert_params() * _act_bytes(req)
        where = (f"{copy / GiB:.1f} GiB" if not req.gradient_checkpointing
                 else f"{copy / max(a_.n_moe_layers, 1) / GiB:.1f} GiB at a time with checkpointing")
        if req.trainer == "hf":
            notes.append(f"PEFT maps gate/up/down_proj targets of {a_.family} onto the fused routed experts: LoRA on "
                         f"every expert, dense MLPs and shared experts get none, and W+ΔW of each MoE layer is kept "
                         f"for backward ({where}); --lora-targets attention avoids it")
            if req.lora_dropout > 0:
                notes.append("PEFT refuses lora_dropout > 0 on fused experts (ParamWrapper): set lora.dropout: 0 "
                             "or target attention only")
        elif copy > 0.02 * req.gpu.memory_bytes:
            notes.append(f"LoRA on the fused routed experts keeps W+ΔW of each MoE layer for backward ({where}); "
                         f"lora.target_modules without gate/up/down_proj (--lora-targets attention) avoids it")
    return Estimate(weights=weights, adapter=adapter, gradients=grad_b, optimizer=opt_b, activations=act_b,
                    logits=log_b, overhead=overhead, phase=phase, pageable=pageable, trainable_params=train_n,
                    total_params=a.total_params(), notes=notes)


def with_batch(req: PlanRequest, micro_batch: int) -> PlanRequest:
    return replace(req, micro_batch=micro_batch)
