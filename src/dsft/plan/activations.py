"""Activation bytes of one training step: what autograd saves per layer, and the logits/loss tensors."""

from __future__ import annotations

from dataclasses import dataclass

from dsft.plan.request import (
    MLP_NAMES,
    PlanRequest,
    act_bytes,
    esft_first,
    esft_selected,
    fp8_expert_lora,
    freeze_first,
    fused_expert_lora,
    packed_mask,
    target_names,
    targets,
    weight_bytes,
)


# ---- activations -----------------------------------------------------------------------------------------------
# Each function below walks one block of a decoder layer's forward in order, one line per tensor autograd saves, so
# each line stays checkable against the Hugging Face modelling code.
@dataclass
class _Saved:
    """What one layer's linears and norms keep for backward, per token, under a training mode."""

    req: PlanRequest
    full: bool  # every weight of the layer trains
    lora: bool  # frozen base + adapters
    tset: set[str]  # names of the adapted linears
    p: float  # LoRA dropout
    r: int  # LoRA rank
    ab: float  # bytes per activation
    li: float  # bytes of a LoRA input copy
    mask: float  # bytes per element of a dropout mask
    cast: bool  # 16-bit activations: adapters get an fp32 (or autocast) copy of their input
    norm_w: bool  # the norms' weights train

    @classmethod
    def of(cls, req: PlanRequest, i: int, mode: str) -> _Saved:
        ab, f32 = act_bytes(req), 4.0
        lora = mode == "lora"
        cast = ab != f32
        # PEFT keeps adapters in fp32 and casts each LoRA input to fp32 first (a separate copy per module when the
        # base computes in 16-bit); dropout then copies it again and keeps a mask. Under autocast (dsft train in
        # 16-bit) the adapter matmuls run in 16-bit, so what lora_A keeps is a 16-bit cast of that copy.
        # CUDA's fused dropout keeps a bool mask (1 byte); the CPU path keeps a full-precision noise tensor.
        return cls(req=req, full=mode == "full", lora=lora,
                   tset={lin.name for lin in targets(req, i)} if lora else set(),
                   p=req.dropout if lora else 0.0, r=req.rank if lora else 0, ab=ab,
                   li=ab if (cast and req.trainer == "dsft") else f32, mask=1.0 if req.gpu.cuda else f32,
                   cast=cast, norm_w=mode == "full" or (lora and req.mts))

    def lin_in(self, name: str, width: int, already_saved: bool, grad_in: bool = True, tset=None) -> float:
        """Bytes a linear keeps of its input: full → the input; LoRA → a dropout copy + mask (or the input)."""
        if self.full:
            return 0.0 if already_saved else width * self.ab
        if name in (self.tset if tset is None else tset):
            if self.p > 0:
                return width * self.li + (width * self.mask if grad_in else 0.0) + self.r * self.li
            return self.r * self.li + (width * self.li if self.cast else (0.0 if already_saved else width * self.ab))
        return 0.0

    def lin_group(self, names: list[str], width: int, grad_in: bool = True, tset=None) -> float:
        """Several linears reading the same input (q/k/v, gate/up)."""
        if self.full:
            return width * self.ab
        ts = [n for n in names if n in (self.tset if tset is None else tset)]
        if not ts:
            return 0.0
        if self.p > 0:
            return len(ts) * (width * self.li + (width * self.mask if grad_in else 0.0) + self.r * self.li)
        if self.cast:
            return len(ts) * (width * self.li + self.r * self.li)
        return width * self.ab + len(ts) * self.r * 4.0

    def norm(self, width: int, grad_in: bool) -> float:
        """RMSNorm upcasts to fp32 and keeps that input and rsqrt (when the input needs grad), and the normalized
        value cast back (when the weight trains)."""
        return (width * 4.0 + 4.0 if grad_in else 0.0) + (width * self.ab if self.norm_w else 0.0)


def _attention_bytes(sv: _Saved, input_grad: bool) -> float:
    """Input norm + self-attention (MLA or multi-head/GQA) + the second norm, per token."""
    req, a, ab, f32 = sv.req, sv.req.arch, sv.ab, 4.0
    h = a.hidden
    s = sv.norm(h, input_grad)
    if a.mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        qa = a.q_lora_rank or 0
        first = ["q_a_proj", "kv_a_proj_with_mqa"] if qa else ["q_proj", "kv_a_proj_with_mqa"]
        s += sv.lin_group(first, h, input_grad)
        if qa:
            s += sv.norm(qa, True) + sv.lin_in("q_b_proj", qa, False)  # q_a out kept by q_a_layernorm
        kvr = a.kv_lora_rank + a.qk_rope_head_dim
        # kv_a out (its split view is upcast for kv_a_layernorm; in fp32 the view keeps all of kv_a out alive)
        s += (kvr * ab if ab == 4 else a.kv_lora_rank * f32) + f32 + (a.kv_lora_rank * ab if sv.norm_w else 0.0)
        s += sv.lin_in("kv_b_proj", a.kv_lora_rank, False)
        s += 2 * a.heads * qk * ab  # query_states (cat) and key_states (new_empty + copy) kept by attention
        s += a.heads * (a.qk_nope_head_dim + a.v_head_dim) * ab  # kv_b out, alive through the value view
        s += a.o_dim * ab + a.heads * f32  # attention output + logsumexp
        s += sv.lin_in("o_proj", a.o_dim, False)  # the (B,H,S,D) output is copied to (B,S,H·D) for o_proj
    else:
        s += sv.lin_group(["q_proj", "k_proj", "v_proj"], h, input_grad)
        packed = req.attn == "dsft_packed"  # dsft's CPU packed path: SDPA per sample, outputs concatenated
        gqa_repeat = a.kv_heads != a.heads and req.attn in ("eager", "dsft_packed")
        kv = a.q_dim if gqa_repeat else a.kv_heads * a.hd
        s += (a.q_dim + 2 * kv) * ab  # rotated q, k and v kept by attention
        s += a.q_dim * ab + a.heads * f32  # attention output (already (B,S,H,D)) + logsumexp
        s += sv.lin_in("o_proj", a.o_dim, not packed)  # the packed path's output is a fresh (B,S,H·D) copy
    if req.attn == "eager":
        s += a.heads * req.row_len * 2 * ab  # softmax probabilities (+ the scores they came from)
    if packed_mask(req):
        s += req.row_len * ab  # SDPA turns the packed block-diagonal bool mask into a float bias and keeps it
    return s + sv.norm(h, True)  # residual after attention, kept by the second norm


def _moe_bytes(sv: _Saved) -> tuple[float, float, float]:
    """A MoE block: shared experts, router, routed experts. (per token, backward transient per token, per layer)."""
    req, a, ab, f32 = sv.req, sv.req.arch, sv.ab, 4.0
    h, k, mi = a.hidden, a.experts_per_token, a.moe_intermediate
    fused = sv.lora and fused_expert_lora(req)
    w = mi * a.n_shared_experts
    s = 0.0
    if w:
        s += sv.lin_group(["gate_proj", "up_proj"], h)
        s += 3 * w * ab + sv.lin_in("down_proj", w, False)  # gate (silu input), silu out, up; product for down
    if sv.full:
        s += 0.0 if w else h * ab  # the router's fp32 input when nothing else keeps the normed input
    # router (fp32): sigmoid scores, group/top-k indices, normalised weights
    s += a.n_routed_experts * (f32 + 1) + k * (8 + 2 * f32) + 8 * 2 + f32
    s += k * 3 * 8  # sort permutation, gather index, inverse permutation (int64)
    s += k * (2 * mi + mi + h) * ab + k * f32  # gate_up out, silu out, down out (kept to apply routing weights)
    if sv.full or fused:
        s += k * (h + mi) * ab  # gathered inputs and products, kept for the expert weights' gradients
    if sv.lora and fp8_expert_lora(req):
        # FP8 base: one FP8 expert MLP per expert, PEFT LoRA on each projection: the adapters keep their inputs
        # (the gathered tokens for gate/up, the product for down) and the per-expert token indices (int64)
        ex = target_names(req) & MLP_NAMES
        s += k * (sv.lin_group(["gate_proj", "up_proj"], h, tset=ex) + sv.lin_in("down_proj", mi, False, tset=ex) + 2 * 8)
        if req.method == "dora":  # DoRA keeps the base and LoRA outputs (fp32) of each adapted projection
            s += k * sum(2 * (h if n == "down_proj" else mi) * f32 for n in ex)
    per_layer = a.n_routed_experts * a.expert_params() * ab if fused else 0.0  # PEFT's W + ΔW, kept for backward
    return s, (2 * h + 2 * k * mi + 2 * w) * ab, per_layer


def _esft_expert_bytes(req: PlanRequest, i: int, input_grad: bool) -> float:
    """method esft, per token: the k·share token-slots that reach a selected expert run through its trainable copy
    (dsft.train.esft): the gathered input (for gate_up's weight gradient), gate_up out, silu out, the product (down's
    input), down out (kept by the routing-weight multiply when the weights need grad), the slot's routing weight and
    int64 token/slot indices; plus the frozen kernel's masked routing weights (k fp32)."""
    a = req.arch
    if not esft_selected(req, i):
        return 0.0
    ab, h, k, mi = act_bytes(req), a.hidden, a.experts_per_token, a.moe_intermediate
    share = min(1.0, req.esft_top_p)
    per_slot = (h + 2 * mi + mi + mi + (h if input_grad else 0)) * ab + 4 + 2 * 8
    return k * share * per_slot + (k * 4 if input_grad else 0.0)


def layer_bytes(req: PlanRequest, i: int, mode: str, input_grad: bool = True) -> tuple[float, float, float]:
    """Bytes per token of layer i: (saved for backward, transient in its backward) and bytes per layer that do
    not scale with tokens (PEFT's W+ΔW of fused experts, kept for backward).

    mode: "full" (weights train), "lora" (frozen base + adapters), "frozen-input" is expressed by input_grad=False:
    the layer input does not require grad (first layer under LoRA / freeze, fed by a frozen embedding), so the
    first norm and the first dropouts save nothing.
    """
    a = req.arch
    sv = _Saved.of(req, i, mode)
    if mode == "esft" and not input_grad:  # the first trained layer: only its selected experts keep anything
        mi = a.moe_intermediate
        return _esft_expert_bytes(req, i, False), (2 * a.hidden + 2 * a.experts_per_token * mi) * sv.ab, 0.0
    s = _attention_bytes(sv, input_grad)
    if mode == "esft":
        s += _esft_expert_bytes(req, i, True)
    per_layer = 0.0
    if a.is_moe_layer(i):
        moe, bwd, per_layer = _moe_bytes(sv)
        s += moe
    else:
        it = a.intermediate
        s += sv.lin_group(["gate_proj", "up_proj"], a.hidden)
        s += 3 * it * sv.ab + sv.lin_in("down_proj", it, False)
        bwd = (2 * a.hidden + 2 * it) * sv.ab  # gradients of the MLP's inputs while its saved tensors are released
    if sv.lora and req.method == "dora":
        # DoRA rescales the base output and the LoRA output by the magnitude: both (fp32) are kept for backward
        s += sum(2 * lin.d_out * 4.0 for lin in targets(req, i))
    return s, bwd, per_layer


def layer_mode(req: PlanRequest, i: int) -> str:
    if req.method == "full":
        return "full"
    if req.method == "freeze":
        return "full" if i >= freeze_first(req) else "none"
    if req.method == "esft":  # frozen layers that pass gradients down to the first trained experts
        return "esft" if i >= esft_first(req) else "none"
    return "lora"


@dataclass
class Activations:
    saved: list[float]  # bytes per layer kept through the forward pass
    recompute: list[float]  # bytes of one layer's saved tensors when recomputed (checkpointing)
    bwd_temp: list[float]
    final: float  # final norm (+ lm_head input)


def activations(req: PlanRequest) -> Activations:
    a = req.arch
    ab = act_bytes(req)
    tok = req.tokens
    saved, rec, bwd = [], [], []
    # dsft's checkpointing makes the embedding output require grad (enable_input_require_grads)
    emb_grad = req.mts or (req.gradient_checkpointing and (req.adapter or req.method == "esft")
                           and req.trainer == "dsft")
    for i in range(a.layers):
        mode = layer_mode(req, i)
        if req.method == "esft" and emb_grad:
            mode = "esft"  # gradients flow to the embedding output through every layer
        if mode == "none":
            saved.append(0.0)
            rec.append(0.0)
            bwd.append(0.0)
            continue
        first_trainable = (i == 0 and req.method != "full" and not emb_grad) or (
            req.method == "freeze" and i == freeze_first(req)) or (
            req.method == "esft" and not emb_grad and i == esft_first(req))
        per_tok, tmp, per_layer = layer_bytes(req, i, mode, input_grad=not first_trainable)
        full_layer = per_tok * tok + per_layer
        if req.gradient_checkpointing:
            saved.append(a.hidden * tok * ab + (tok * req.row_len if packed_mask(req) and i == 0 else 0.0))
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
    return Activations(saved, rec, bwd, final)


def logits_phases(req: PlanRequest) -> tuple[float, float]:
    """(forward peak, backward peak) bytes of logits + loss: lm_head out, fp32 log-softmax, their gradients."""
    a = req.arch
    ab = act_bytes(req)
    if req.trainer == "dsft":
        # dsft: hidden states of labelled tokens gathered, logits in chunks, each chunk's fp32 log-softmax kept
        sel = req.labelled_tokens
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



# ---- no-grad forwards: the reference policy (DPO, GRPO with beta) and GRPO's rollouts ---------------------------
def nograd_layer_bytes(req: PlanRequest, i: int, b: float, span: int, packed: bool) -> float:
    """Bytes per token alive at the peak of layer i's forward without autograd (each temporary freed when used):
    the residual stream and the normed input, plus the attention's or the MLP's working set, whichever is larger.
    b: bytes per activation; span: keys per query (eager scores); packed: SDPA's block-diagonal mask as a float bias."""
    a = req.arch
    h = a.hidden
    norm = h * 4 + h * b  # RMSNorm's fp32 upcast and its output
    if a.mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        # q (+ the rotated/concatenated copy), kv_a out, kv_b out (kept as the value view), expanded keys, output
        attn = 2 * a.heads * qk + a.kv_lora_rank + a.qk_rope_head_dim + a.heads * (a.qk_nope_head_dim + a.v_head_dim)
        attn = (attn + a.heads * qk + a.o_dim) * b
    else:
        kv = a.kv_heads * a.hd
        attn = (2 * (a.q_dim + 2 * kv) + a.o_dim) * b  # q, k, v and their rotated copies, the output
    if req.attn == "eager":
        attn += a.heads * span * 2 * b  # scores and probabilities
    if packed:
        attn += span * (1 + b)  # the bool block mask and its float bias
    if a.is_moe_layer(i):
        k, mi = a.experts_per_token, a.moe_intermediate
        w = mi * a.n_shared_experts
        mlp = 3 * w * b + k * (3 * mi + h) * b + a.n_routed_experts * 4 * 2 + k * 3 * 8
    else:
        mlp = 3 * a.intermediate * b  # silu(gate), up and their product (gate freed by silu)
    return 2 * h * b + max(norm, attn, mlp)


def nograd_forward_bytes(req: PlanRequest, tokens: float, b: float, span: int, packed: bool) -> float:
    """Peak bytes of a no-grad forward of `tokens` through the decoder (the largest layer's working set)."""
    return tokens * max(nograd_layer_bytes(req, i, b, span, packed) for i in range(req.arch.layers))


def reference_forward_bytes(req: PlanRequest) -> float:
    """Transient peak of the reference log-probs, computed inside the loss after the policy's (dsft's
    LogProbLoss.token_logps under no_grad: the decoder forward, then the LM head in chunks on labelled tokens):
    the larger of a decoder layer's working set and the last hidden state + gathered rows + one chunk's logits
    (16-bit, fp32 copy and fp32 log-softmax)."""
    if not req.reference_forward:
        return 0.0
    a = req.arch
    ab = act_bytes(req)
    decoder = nograd_forward_bytes(req, req.tokens, ab, req.row_len, packed_mask(req))
    sel = req.labelled_tokens
    c = min(req.loss_chunk, sel)
    head = req.tokens * a.hidden * ab + sel * a.hidden * ab + sel * 4 + c * a.vocab * (ab + 4 + 4)
    return max(decoder, head)


def kv_bytes_per_token(req: PlanRequest) -> float:
    """KV-cache bytes per token per layer during generation, in the model's stored dtype (generation runs outside
    autocast). transformers 5's DeepSeek-V2/V3 MLA caches the compressed latent (kv_lora_rank + qk_rope_head_dim,
    one head), not the per-head K/V (it re-expands them through kv_b_proj at every step); other models cache K and
    V per KV head."""
    a = req.arch
    gb = weight_bytes(req)
    if a.mla:
        return (a.kv_lora_rank + a.qk_rope_head_dim) * gb
    return 2 * a.kv_heads * a.hd * gb


def rollout_kv_cache(req: PlanRequest, length: int | None = None) -> float:
    """KV cache of a micro-batch of prompts' G completions each at `length` tokens (default prompt + max completion):
    layers × micro-batch × G × length × per-token bytes (dsft decodes a micro-batch of prompts together, each
    prompt's cache repeated for its G rows)."""
    if not req.grpo:
        return 0.0
    n = req.rollout_len if length is None else length
    return req.arch.layers * req.micro_batch * req.num_generations * n * kv_bytes_per_token(req)


def rollout_work(req: PlanRequest) -> tuple[float, float]:
    """(prefill, last decode step) transient bytes of generating a micro-batch of prompts' G completions, beside the
    cache: prefill = a no-grad forward of the prompts (once each, not G times) plus the sampling logits of their G
    rows; decode at full length = MLA's per-layer re-expansion of the whole cache (kv_b_proj out + keys, per head)
    or the growing cache's copy of one layer (torch.cat), plus the sampling logits (16-bit, fp32 copy, scaled,
    softmax) of every row."""
    if not req.grpo:
        return 0.0, 0.0
    a = req.arch
    gb = weight_bytes(req)
    rows, P, T = req.micro_batch * req.num_generations, req.rollout_prompt, req.rollout_len
    prefill = nograd_forward_bytes(req, req.micro_batch * P, gb, P, False) + rows * a.vocab * (gb + 3 * 4)
    if a.mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        step = rows * T * a.heads * (a.qk_nope_head_dim + a.v_head_dim + qk) * gb
    else:
        step = rows * T * a.kv_heads * a.hd * gb
    decode = step + rows * a.vocab * (gb + 3 * 4)
    return prefill, decode
