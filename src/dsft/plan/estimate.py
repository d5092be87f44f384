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
    """True when the training loop keeps the model output (logits) alive through backward."""

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
        if self.attn not in ("sdpa", "eager", "flash_attention_2"):
            raise bad("attn", self.attn, "sdpa, eager or flash_attention_2")
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
def _targets(req: PlanRequest, i: int) -> list:
    lins = [lin for lin in req.arch.layer_linears(i) if lin.lora]
    if req.lora_targets == "all" or req.lora_targets == "auto":
        return lins
    names = set(req.lora_targets)
    return [lin for lin in lins if lin.name in names]


def adapter_params(req: PlanRequest) -> int:
    r = req.rank
    n = 0
    for i in range(req.arch.layers):
        for lin in _targets(req, i):
            n += r * (lin.d_in + lin.d_out) + (lin.d_out if req.method == "dora" else 0)
    return n


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
        return (lin + experts) * QLORA_BYTES + rest * 2
    return a.total_params() * wb


# ---- activations -----------------------------------------------------------------------------------------------
def _norm(width: int, weight_trainable: bool, out_saved_by_next: bool) -> float:
    """RMSNorm: input (pow/mul), rsqrt, normalized (if the weight trains), output (if the next op saves it)."""
    return width * (1 + (1 if weight_trainable else 0) + (1 if out_saved_by_next else 0)) + 1


def _layer_elems(req: PlanRequest, i: int, mode: str) -> tuple[float, float]:
    """(elements saved for backward per token, extra transient elements per token in this layer's backward)."""
    a = req.arch
    h = a.hidden
    ab = _act_bytes(req)
    mask = 1.0 / ab  # dropout masks are bool (1 byte)
    full = mode == "full"
    lora = mode == "lora"
    p = req.lora_dropout if lora else 0.0
    tset = {lin.name for lin in _targets(req, i)} if lora else set()
    r = req.rank if lora else 0

    def lin_in(name: str, width: int, shared_saved: bool) -> float:
        """What a linear keeps of its input: full → the input; LoRA → a dropout copy + mask (or the input)."""
        if full:
            return 0.0 if shared_saved else width
        if name in tset:
            return (width + width * mask + r) if p > 0 else (r + (0.0 if shared_saved else width))
        return 0.0

    def lin_group(names: list[str], width: int) -> float:
        """Several linears reading the same input (q/k/v, gate/up)."""
        if full:
            return width
        ts = [n for n in names if n in tset]
        if not ts:
            return 0.0
        if p > 0:
            return len(ts) * (width * (1 + mask) + r)
        return width + len(ts) * r

    s = 0.0
    s += h  # layer input (kept by the norm; also the residual)
    s += _norm(h, full, False) - h  # rsqrt (+ normalized when the weight trains)
    if a.mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        qa = a.q_lora_rank or 0
        first = ["q_a_proj", "kv_a_proj_with_mqa"] if qa else ["q_proj", "kv_a_proj_with_mqa"]
        s += lin_group(first, h)
        if qa:
            s += (qa + 1) + (qa if full else 0)  # q_a out kept by q_a_layernorm (+ normalized)
            s += lin_in("q_b_proj", qa, False)
        kvr = a.kv_lora_rank + a.qk_rope_head_dim
        s += kvr + 1 + (a.kv_lora_rank if full else 0)  # kv_a out kept by kv_a_layernorm
        s += lin_in("kv_b_proj", a.kv_lora_rank, False)
        s += a.heads * a.qk_rope_head_dim * 0  # rotary temporaries are freed
        s += a.heads * qk  # query_states (cat) kept by attention
        s += a.heads * qk  # key_states (new_empty + copy) kept by attention
        s += a.heads * (a.qk_nope_head_dim + a.v_head_dim)  # kv_b out stays alive through the value view
        s += a.o_dim + a.heads  # attention output + logsumexp
    else:
        s += lin_group(["q_proj", "k_proj", "v_proj"], h)
        gqa_repeat = a.kv_heads != a.heads and req.attn == "eager"
        kv = a.q_dim if gqa_repeat else a.kv_heads * a.hd
        s += a.q_dim + 2 * kv  # rotated q, k and v kept by attention
        s += a.q_dim + a.heads  # attention output + logsumexp
    if req.attn == "eager":
        s += a.heads * req.seq_len * 2  # scores after softmax (+ dropout-free matmul input)
    s += lin_in("o_proj", a.o_dim, True)
    s += h  # residual after attention
    s += _norm(h, full, False) - h
    if a.is_moe_layer(i):
        k = a.experts_per_token
        mi = a.moe_intermediate
        w = mi * a.n_shared_experts
        s += lin_group(["gate_proj", "up_proj"], h) if w else 0.0
        if w:
            s += 3 * w + lin_in("down_proj", w, False)  # gate (silu input), silu out, up; product kept by down
        s += a.n_routed_experts * 2 + 2  # router logits / sigmoid scores
        s += k * (3 * mi + h + 1)  # per routed token: gate_up out, silu out, expert output scaled by its weight
        if full:
            s += k * (h + mi)  # gathered inputs and products kept for expert weight gradients
        s += h  # routed output (zeros + index_add) added to the shared output
        bwd = 4 * h + k * (4 * mi + 2 * h)
    else:
        it = a.intermediate
        s += lin_group(["gate_proj", "up_proj"], h)
        s += 3 * it + lin_in("down_proj", it, False)
        bwd = 4 * h + 4 * it
    return s, bwd


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
    final: float  # final norm etc.


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
        elems, tmp = _layer_elems(req, i, mode)
        full_layer = elems * tok * ab
        if req.gradient_checkpointing:
            saved.append(a.hidden * tok * ab)
            rec.append(full_layer)
        else:
            saved.append(full_layer)
            rec.append(0.0)
        bwd.append(tmp * tok * ab)
    head_trains = req.method == "full"
    trains_any = req.method != "freeze" or req.freeze_layers > 0
    final = _norm(a.hidden, head_trains, head_trains) * tok * ab if trains_any else 0.0
    return _Acts(saved, rec, bwd, final)


def _logits_phases(req: PlanRequest) -> tuple[float, float]:
    """(forward peak, backward peak) bytes of logits + loss: lm_head out, fp32 log-softmax, their gradients."""
    a = req.arch
    ab = _act_bytes(req)
    n = req.tokens * a.vocab
    logits = n * ab
    upcast = n * 4 if ab != 4 else 0
    fwd = logits + upcast + n * 4  # logits, fp32 copy, log-softmax output
    held = logits if req.hold_logits else 0.0
    bwd = held + 3 * n * 4 + (n * ab if ab != 4 else 0)  # log-probs, nll grad, softmax grad (+ cast back)
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
        adapter = train_n * 4.0  # PEFT keeps adapter weights in fp32
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
    if req.cpu_offload:
        notes.append("optimizer state (and fp32 master weights) offloaded to CPU")
        opt = 0.0
        if req.sharding in ("zero3", "fsdp"):
            weights = weights / 4  # parameters live on CPU; only gathered layers on GPU
    if req.optimizer.startswith("paged"):
        pageable = opt
        notes.append("paged optimizer: its state can spill to CPU memory under pressure")

    # temporaries of the optimizer step: per-tensor on CPU, multi-tensor (foreach) on CUDA
    largest = max([a.embed_params, a.head_params] + [lin.params for lin in a.layer_linears(0)]) if not req.adapter else 0
    if req.optimizer == "sgd" or req.cpu_offload:
        step_tmp = 0.0
    elif req.gpu.cuda:
        step_tmp = 0.0  # fused AdamW (the Trainer's default on CUDA) updates in place
    else:
        step_tmp = (largest if not req.adapter else 0) * param_bytes * 2
    if req.sharding in ("zero3", "fsdp") and req.num_gpus > 1:
        gathered = 2 * max(a.layer_params(i) for i in range(a.layers)) * (2 if wb == 4 else wb)
        weights += gathered
        notes.append("ZeRO-3/FSDP: two layers' parameters gathered at a time")

    acts = _activations(req)
    lfwd, lbwd = _logits_phases(req)
    static = weights + adapter + opt

    # gradients per layer in backward order (full: every parameter; adapters: their weights)
    layer_grad = []
    for i in range(a.layers):
        if req.adapter:
            g = sum(req.rank * (lin.d_in + lin.d_out) for lin in _targets(req, i)) * 4
        elif req.method == "full" or i >= _freeze_first(req):
            g = a.layer_params(i) * param_bytes
        else:
            g = 0.0
        layer_grad.append(g / grad_div)
    head_grad = (a.head_params if req.method == "full" else 0) * param_bytes / grad_div
    embed_grad = (a.embed_params if req.method == "full" else 0) * param_bytes / grad_div
    if req.method == "full" and a.tie_embeddings:
        head_grad = a.embed_params * param_bytes / grad_div
        embed_grad = 0.0

    ab = _act_bytes(req)
    hid = req.tokens * a.hidden * ab
    saved_total = sum(acts.saved) + acts.final + hid  # + embedding output
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
        work = acts.recompute[i] + acts.bwd_temp[i] + 2 * hid
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
    return Estimate(weights=weights, adapter=adapter, gradients=grad_b, optimizer=opt_b, activations=act_b,
                    logits=log_b, overhead=overhead, phase=phase, pageable=pageable, trainable_params=train_n,
                    total_params=a.total_params(), notes=notes)


def with_batch(req: PlanRequest, micro_batch: int) -> PlanRequest:
    return replace(req, micro_batch=micro_batch)
