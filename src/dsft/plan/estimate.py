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

from dsft.plan.activations import (
    activations,
    logits_phases,
    reference_forward_bytes,
    rollout_kv_cache,
    rollout_work,
)
from dsft.plan.hardware import GiB
from dsft.plan.models import fmt_count
from dsft.plan.request import (  # noqa: F401  (PlanRequest and the constants are part of this module's API)
    CUDA_CONTEXT,
    FRAGMENTATION,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    QLORA_BYTES,
    SHARDING,
    PlanRequest,
    act_bytes,
    base_weight_bytes,
    esft_selected,
    fp8_base,
    freeze_first,
    fused_expert_lora,
    gathered_bytes_per_param,
    layer_adapter,
    mts_params,
    packed_mask,
    shard_divisors,
    targets,
    trainable_params,
    weight_bytes,
)


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
    reference: float = 0.0
    """A frozen copy of the model as the reference policy (DPO / GRPO with beta > 0 under full or freeze)."""
    reference_forward: float = 0.0
    """The reference's no-grad forward inside the loss, when the peak is there."""
    kv_cache: float = 0.0
    """GRPO: the rollout KV cache, when the peak is during generation."""
    rollout_work: float = 0.0
    """GRPO: generation's transient tensors (prefill forward / re-expanded MLA keys, sampling logits) at that peak."""
    objective_keys: tuple[str, ...] = ()
    """The objective's own breakdown lines (shown even when 0 at the peak)."""
    objective_terms: dict[str, float] = field(default_factory=dict)
    """Each objective term at its own largest moment, and the allocated bytes of the objective's moments."""

    @property
    def allocated(self) -> float:
        """What torch's allocator holds at the peak (compare with torch.cuda.max_memory_allocated)."""
        return (self.weights + self.adapter + self.reference + self.gradients + self.optimizer + self.activations
                + self.logits + self.reference_forward + self.kv_cache + self.rollout_work)

    @property
    def peak(self) -> float:
        return self.allocated + self.overhead

    def breakdown(self) -> dict[str, float]:
        extra = {"reference_model": self.reference, "reference_forward": self.reference_forward,
                 "rollout_kv_cache": self.kv_cache, "rollout_work": self.rollout_work}
        d = {"weights": self.weights, "adapter": self.adapter}
        if "reference_model" in self.objective_keys:
            d["reference_model"] = self.reference
        d.update({"gradients": self.gradients, "optimizer": self.optimizer, "activations": self.activations,
                  "logits_loss": self.logits})
        d.update({k: extra[k] for k in self.objective_keys if k != "reference_model"})
        d["overhead"] = self.overhead
        return d


# ---- resident state: weights, adapter, optimizer ----------------------------------------------------------------
@dataclass
class Resident:
    """What lives on the GPU for the whole step, and what the optimizer step adds."""

    weights: float
    adapter: float
    optimizer: float
    pageable: float
    step_tmp: float  # temporaries of the optimizer step
    param_bytes: int  # bytes per trainable parameter (and per gradient element)
    offload_grads: float  # share of the gradients on the GPU at once (CPU offload streams them out)
    trainable: int
    notes: list[str]
    reference: float = 0.0  # frozen reference copy (DPO / GRPO with beta, full or freeze)


def _optimizer_state(req: PlanRequest, train_n: int, param_bytes: int) -> float:
    """AdamW moments in the trainable parameters' dtype (8-bit: 1 byte each + block scales), sharded by ZeRO."""
    if req.optimizer == "sgd":
        opt = 0.0
    elif req.optimizer.endswith("8bit"):
        opt = train_n * 2 * (1 + 4 / 2048)
    else:
        opt = train_n * 2 * param_bytes
    return opt / shard_divisors(req)[0]


def _step_temporaries(req: PlanRequest, train_n: int, param_bytes: int) -> float:
    """Temporaries of the optimizer step: per-tensor on CPU, multi-tensor (foreach) for dsft, none for fused AdamW."""
    a = req.arch
    if req.optimizer == "sgd" or req.cpu_offload:
        return 0.0
    if req.trainer == "dsft":
        return train_n * param_bytes / shard_divisors(req)[0]  # foreach AdamW: one √v temporary per parameter
    if req.gpu.cuda:
        return 0.0  # fused AdamW (the HF Trainer's default on CUDA) updates in place
    largest = max([a.embed_params, a.head_params] + [lin.params for lin in a.layer_linears(0)]) if not req.adapter else 0
    return (largest if not req.adapter else 0) * param_bytes * 2


def _gathered_params(req: PlanRequest, notes: list[str]) -> float:
    """Bytes of parameters ZeRO-3 / FSDP hold gathered at once on each GPU (0 without parameter sharding)."""
    a = req.arch
    if not (req.sharding in ("zero3", "fsdp") and (req.num_gpus > 1 or req.cpu_offload)):
        return 0.0
    if req.sharding == "fsdp":  # one decoder layer per FSDP unit, the next one prefetched
        live = 2 * max(a.layer_params(i) for i in range(a.layers))
        notes.append("FSDP: two decoder layers' parameters gathered at a time")
    else:  # DeepSpeed: up to stage3_max_live_parameters (1e9) elements, whole tensors
        largest_tensor = max(a.embed_params, a.n_routed_experts * 2 * a.moe_intermediate * a.hidden, a.largest_linear())
        live = min(max(largest_tensor, 1e9), a.total_params())
        notes.append(f"ZeRO-3: up to {fmt_count(live)} parameters gathered at a time")
    return live * gathered_bytes_per_param(req)


def resident(req: PlanRequest) -> Resident:
    """Weights, adapter and optimizer state per GPU (after ZeRO / FSDP sharding and CPU offload)."""
    opt_div, grad_div, par_div = shard_divisors(req)
    wb = weight_bytes(req)
    notes: list[str] = []
    base = base_weight_bytes(req)
    train_n = trainable_params(req)
    weights = base / par_div
    if req.adapter:
        mts_n = mts_params(req) if req.mts else 0
        # PEFT keeps adapter weights in fp32; modules_to_save are trainable copies in the weights' dtype
        adapter = ((train_n - mts_n) * 4.0 + mts_n * wb) / par_div
        param_bytes = 4
    elif req.method == "esft":  # the selected experts' trainable copies, beside the frozen fused tensors
        adapter = train_n * wb / par_div
        param_bytes = wb
    else:
        adapter = 0.0
        param_bytes = wb
    opt = _optimizer_state(req, train_n, param_bytes)
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
    pageable = 0.0
    if req.optimizer.startswith("paged"):
        pageable = opt
        notes.append("paged optimizer: its state can spill to CPU memory under pressure")
    step_tmp = _step_temporaries(req, train_n, param_bytes)
    weights += _gathered_params(req, notes)
    return Resident(weights, adapter, opt, pageable, step_tmp, param_bytes, offload_grads, train_n, notes,
                    reference_copy(req))


def reference_copy(req: PlanRequest) -> float:
    """Bytes of the reference policy's own weights: dsft's Reference deep-copies the model as it is held (stored
    dtype, fp32 under AMP or fp16 master weights, FP8 blocks kept) before DDP/FSDP/DeepSpeed wrap it, so the copy
    is whole on every GPU; with adapters the reference is the base with adapters disabled (nothing extra)."""
    return base_weight_bytes(req) if req.reference_copy else 0.0


# ---- gradients and per-layer temporaries ------------------------------------------------------------------------
def _gradients(req: PlanRequest, res: Resident) -> tuple[list[float], float, float]:
    """Gradient bytes per layer (backward order is top-down), of the LM head and of the embeddings."""
    a = req.arch
    grad_div = shard_divisors(req)[1]
    wb = weight_bytes(req)
    layer_grad = []
    for i in range(a.layers):
        if req.adapter:
            g = layer_adapter(req, i) * 4.0
        elif req.method == "esft":
            g = esft_selected(req, i) * a.expert_params() * res.param_bytes
        elif req.method == "full" or i >= freeze_first(req):
            g = a.layer_params(i) * res.param_bytes
        else:
            g = 0.0
        layer_grad.append(g / grad_div * res.offload_grads)
    he = req.method == "full" or req.mts
    hb = res.param_bytes if req.method == "full" else wb
    head_grad = (a.head_params if he else 0) * hb / grad_div * res.offload_grads
    embed_grad = (a.embed_params if he else 0) * hb / grad_div * res.offload_grads
    if he and a.tie_embeddings:
        head_grad = a.embed_params * hb / grad_div * res.offload_grads
        embed_grad = 0.0
    return layer_grad, head_grad, embed_grad


def dequant_temporaries(req: PlanRequest) -> float:
    """Bytes of the FP8 base's largest module dequantized at once: the fp32 block × scale product and its cast
    to the compute dtype (one module at a time, in forward and again in backward; nothing kept)."""
    if not fp8_base(req):
        return 0.0
    from dsft.plan.checkpoint import largest_fp8_module

    return largest_fp8_module(req.arch) * (4 + act_bytes(req))


def _layer_temporaries(req: PlanRequest) -> tuple[float, float]:
    """(bytes that do not scale with tokens, bytes of recomputing a checkpointed layer) per layer in backward."""
    a = req.arch
    ab = act_bytes(req)
    # QLoRA dequantises one weight at a time to 16-bit; DoRA builds W + s·BA (fp32) of a module to take its norm
    layer_tmp = 0.0
    if req.method == "qlora":
        layer_tmp += a.largest_linear() * 2
    if req.method == "dora":
        layer_tmp += max((lin.params for i in range(a.layers) for lin in targets(req, i)), default=0) * 4
    layer_tmp += dequant_temporaries(req)
    # recomputing a checkpointed layer in 16-bit: PEFT's fp32 cast of the widest adapted input (and, under
    # autocast, its fp32 dropout copy) exist for a moment on top of the rebuilt layer
    recompute_tmp = 0.0
    if req.adapter and ab != 4:
        widest = max((lin.d_in for i in range(a.layers) for lin in targets(req, i)), default=0)
        copies = 2 if (req.trainer == "dsft" and req.dropout > 0) else 1
        recompute_tmp = widest * 4 * copies * req.tokens
    return layer_tmp, recompute_tmp


# ---- the timeline ----------------------------------------------------------------------------------------------
@dataclass
class Moment:
    """Allocated bytes at one moment of the step beyond the resident state (weights, adapter, reference copy,
    optimizer state)."""

    phase: str
    activations: float = 0.0
    logits: float = 0.0
    gradients: float = 0.0
    step_tmp: float = 0.0
    reference_forward: float = 0.0
    kv_cache: float = 0.0
    rollout_work: float = 0.0

    @property
    def transient(self) -> float:
        return (self.activations + self.logits + self.gradients + self.step_tmp + self.reference_forward
                + self.kv_cache + self.rollout_work)


def _moments(req: PlanRequest, res: Resident) -> list[Moment]:
    """Allocated bytes at each moment of the step: GRPO's generation (prefill, last decode step), end of forward,
    the reference forward (DPO, GRPO with beta), loss backward, each layer's backward, optimizer step."""
    a = req.arch
    acts = activations(req)
    lfwd, lbwd = logits_phases(req)
    layer_grad, head_grad, embed_grad = _gradients(req, res)
    layer_tmp, recompute_tmp = _layer_temporaries(req)
    hid = req.tokens * a.hidden * act_bytes(req)
    saved_total = sum(acts.saved) + acts.final
    moments = _rollout_moments(req)
    moments.append(Moment("forward (loss)", activations=saved_total, logits=lfwd))
    if req.reference_forward:
        # the policy's chunked log-probs stay (their fp32 log-softmax is saved for backward) while the reference runs
        kept = lfwd - _loss_chunk_bytes(req)
        moments.append(Moment("reference forward (loss)", activations=saved_total, logits=kept,
                              reference_forward=reference_forward_bytes(req)))
    moments.append(Moment("backward (loss)", activations=saved_total + hid, logits=lbwd, gradients=head_grad))
    grads = head_grad
    live = saved_total
    for i in reversed(range(a.layers)):
        grads += layer_grad[i]
        # checkpointing: the peak is the recomputed layer (+ incoming gradient); else the layer's gradient buffers
        work = acts.recompute[i] + 3 * hid + recompute_tmp if req.gradient_checkpointing else acts.bwd_temp[i]
        work += layer_tmp
        moments.append(Moment(f"backward (layer {i})", activations=live + work, gradients=grads))
        live -= acts.saved[i]
    grads += embed_grad
    moments.append(Moment("optimizer step", gradients=grads, step_tmp=res.step_tmp))
    return moments


def _loss_chunk_bytes(req: PlanRequest) -> float:
    """The dsft loss's per-chunk transients in its forward (16-bit logits + fp32 copy), gone after each chunk."""
    if req.trainer != "dsft":
        return 0.0
    ab = act_bytes(req)
    return min(req.loss_chunk, req.labelled_tokens) * req.arch.vocab * (ab + (4 if ab != 4 else 0))


def _rollout_moments(req: PlanRequest) -> list[Moment]:
    """GRPO: generation runs before the step's forward/backward (gradients already freed by the previous step's
    zero_grad(set_to_none)), a micro-batch of prompts at a time with G sequences each: after the prefill and at the last
    decode step."""
    if not req.grpo:
        return []
    prefill, decode = rollout_work(req)
    return [Moment("rollout generation (prefill)", kv_cache=rollout_kv_cache(req, req.rollout_prompt),
                   rollout_work=prefill),
            Moment("rollout generation (decode)", kv_cache=rollout_kv_cache(req), rollout_work=decode)]


def _objective_terms(req: PlanRequest, res: Resident, moments: list[Moment]) -> tuple[tuple[str, ...], dict[str, float]]:
    """The objective's breakdown keys and its terms at their own moments (whatever phase holds the peak)."""
    keys: tuple[str, ...] = ()
    terms: dict[str, float] = {}
    if req.objective == "sft":
        return keys, terms
    static = res.weights + res.adapter + res.optimizer + res.reference
    by_phase = {m.phase: m for m in moments}
    if req.reference_forward:
        keys += ("reference_model", "reference_forward")
        ref = by_phase["reference forward (loss)"]
        terms.update(reference_model=res.reference, reference_forward=ref.reference_forward,
                     reference_forward_allocated=static + ref.transient)
    if req.grpo:
        keys += ("rollout_kv_cache", "rollout_work")
        gen = max((by_phase[p] for p in ("rollout generation (prefill)", "rollout generation (decode)")),
                  key=lambda m: m.transient)
        terms.update(rollout_kv_cache=rollout_kv_cache(req), rollout_work=max(rollout_work(req)),
                     rollout_allocated=static + gen.transient)
    train = [m for m in moments if not m.phase.startswith("rollout")]
    terms["train_allocated"] = static + max(m.transient for m in train)
    return keys, terms


def _notes(req: PlanRequest) -> list[str]:
    """What the user should know about this setup's memory beyond the numbers."""
    a = req.arch
    notes: list[str] = []
    if req.attn == "eager":
        notes.append("eager attention keeps the S×S score matrix per head")
    if packed_mask(req) and req.row_len >= 2048:
        m = a.layers * req.tokens * req.row_len * act_bytes(req)
        notes.append(f"packing through SDPA keeps an S×S float mask per layer ({m / GiB:.1f} GiB); "
                     f"attn_implementation flash_attention_2 (varlen) avoids it")
    if fused_expert_lora(req):
        copy = a.n_moe_layers * a.n_routed_experts * a.expert_params() * act_bytes(req)
        where = (f"{copy / GiB:.1f} GiB" if not req.gradient_checkpointing
                 else f"{copy / max(a.n_moe_layers, 1) / GiB:.1f} GiB at a time with checkpointing")
        if req.trainer == "hf":
            notes.append(f"PEFT maps gate/up/down_proj targets of {a.family} onto the fused routed experts: LoRA on "
                         f"every expert, dense MLPs and shared experts get none, and W+ΔW of each MoE layer is kept "
                         f"for backward ({where}); --lora-targets attention avoids it")
            if req.lora_dropout > 0:
                notes.append("PEFT refuses lora_dropout > 0 on fused experts (ParamWrapper): set lora.dropout: 0 "
                             "or target attention only")
        elif copy > 0.02 * req.gpu.memory_bytes:
            notes.append(f"LoRA on the fused routed experts keeps W+ΔW of each MoE layer for backward ({where}); "
                         f"lora.target_modules without gate/up/down_proj (--lora-targets attention) avoids it")
    notes += _fp8_notes(req)
    return notes


def _fp8_notes(req: PlanRequest) -> list[str]:
    a = req.arch
    if not a.fp8_block:
        return []
    if not fp8_base(req):
        how = "QLoRA re-quantizes them to NF4" if req.method == "qlora" else "the trained weights cannot stay FP8"
        return [f"FP8 checkpoint: dequantized to {req.precision} on load ({how})"]
    bf16 = a.total_params() * weight_bytes(req)
    return [f"FP8 base: frozen linears stay float8_e4m3fn + float32 {a.fp8_block[0]}×{a.fp8_block[1]} block scales "
            f"({base_weight_bytes(req) / GiB:,.1f} GiB vs {bf16 / GiB:,.1f} GiB dequantized), dequantized one module "
            f"at a time in forward and backward ({dequant_temporaries(req) / GiB:.2f} GiB of temporaries)"]


def estimate(req: PlanRequest) -> Estimate:
    """Per-GPU peak memory of one steady-state optimizer step (after step 1 created the optimizer state)."""
    req.validate()
    res = resident(req)
    moments = _moments(req, res)
    m = max(moments, key=lambda c: c.transient)
    opt_b = res.optimizer + m.step_tmp
    keys, terms = _objective_terms(req, res, moments)
    alloc = res.weights + res.adapter + res.reference + opt_b + m.transient - m.step_tmp
    overhead = (CUDA_CONTEXT + FRAGMENTATION * alloc) if req.gpu.cuda else 0.0
    return Estimate(weights=res.weights, adapter=res.adapter, gradients=m.gradients, optimizer=opt_b,
                    activations=m.activations, logits=m.logits, overhead=overhead, phase=m.phase,
                    pageable=res.pageable, trainable_params=res.trainable, total_params=req.arch.total_params(),
                    notes=res.notes + _notes(req), reference=res.reference, reference_forward=m.reference_forward,
                    kv_cache=m.kv_cache, rollout_work=m.rollout_work, objective_keys=keys, objective_terms=terms)


def with_batch(req: PlanRequest, micro_batch: int) -> PlanRequest:
    return replace(req, micro_batch=micro_batch)
