"""One training setup as the planner sees it (PlanRequest), and what it trains: targets, parameters, bytes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsft.errors import ConfigError
from dsft.plan.hardware import GiB, Gpu, cpu_device
from dsft.plan.models import Arch

METHODS = ("lora", "qlora", "dora", "full", "freeze", "esft")
PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd")
SHARDING = ("none", "zero1", "zero2", "zero3", "fsdp")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo")  # train.objective
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")
GRPO_DEFAULT_PROMPT = 512  # `dsft plan --objective grpo` without --seq-len: 512 prompt tokens + the completion

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
    interconnect: str | None = None
    """nvlink | pcie | network | a rate like 50GB/s; None: NVLink for A100/H100/H200, else PCIe (multi-GPU time)."""
    modules_to_save: bool | None = None
    """Embeddings, LM head and norms trained fully next to LoRA; None: dsft's rule (tiny models < 100 M)."""
    objective: str = "sft"
    """train.objective: sft | dpo | orpo | simpo (micro_batch counts pairs: chosen + rejected sequences packed in
    one forward) | grpo (micro_batch counts prompts: G rollouts each in the train forward, sampled a micro-batch of prompts at a
    time before it). seq_len stays data.max_seq_length: one sequence (SFT sample, chosen or rejected, rollout)."""
    num_generations: int = 8
    """grpo.num_generations: G completions sampled per prompt."""
    max_completion_length: int = 1024
    """grpo.max_completion_length: new tokens per completion (planned at full length: the upper bound)."""
    prompt_length: int | None = None
    """GRPO prompt tokens; None: what seq_len leaves next to the completion (the longest prompt dsft keeps)."""
    beta: float = 0.0
    """grpo.beta: KL coefficient; > 0 adds the reference forward (and, for full/freeze, a frozen copy)."""
    esft_experts: int | dict[int, int] | None = None
    """method esft: routed experts trained per MoE layer ({layer: count}, or one count for every MoE layer);
    None: ceil(esft_top_p × routed experts), the most a top_p selection can take on an evenly routed layer."""
    esft_top_p: float = 0.2
    """method esft: share of the routed token-slots that reach the selected experts (ESFT-Token's top_p; the
    profile's measured share when one exists)."""

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
            known = self.arch.linear_names()
            unknown = sorted(target_names(self) - known)
            if unknown or not target_names(self):
                raise bad("lora-targets", ",".join(unknown) or self.lora_targets,
                          "all, attention, or names among " + ", ".join(sorted(known)))
        if self.method == "esft":
            if not self.arch.moe:
                raise bad("method", "esft", "a MoE model (DeepSeek-V2/V3): ESFT trains routed experts")
            if not 0 < self.esft_top_p <= 1:
                raise bad("esft-top-p", self.esft_top_p, "a fraction in (0, 1]")
            if self.trainer != "dsft":
                raise bad("trainer", self.trainer, "dsft with method esft (dsft train runs it)")
        if self.trainer not in ("dsft", "hf"):
            raise bad("trainer", self.trainer, "dsft or hf")
        if not 0 < self.label_fraction <= 1:
            raise bad("label-fraction", self.label_fraction, "a fraction in (0, 1]")
        if self.attn not in ("sdpa", "eager", "flash_attention_2", "dsft_packed"):
            raise bad("attn", self.attn, "sdpa, eager, flash_attention_2 or dsft_packed")
        if self.interconnect is not None:
            from dsft.plan.scaling import link

            link(self.interconnect, self.gpu)  # raises a one-line ConfigError naming what is accepted
        self._validate_objective(bad)
        return self

    def _validate_objective(self, bad: Callable[[str, Any, str], ConfigError]) -> None:
        """train.objective and the GRPO shape (dsft train's own limits), one-line errors as the fields above."""
        if self.objective not in OBJECTIVES:
            raise bad("objective", self.objective, "one of " + ", ".join(OBJECTIVES))
        if self.objective != "sft" and self.trainer != "dsft":
            raise bad("trainer", self.trainer, f"dsft with objective {self.objective} (dsft train runs it)")
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise bad("num-generations", self.num_generations, "an integer ≥ 2 (completions per prompt)")
        for key in ("max_completion_length", "prompt_length"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise bad(key.replace("_", "-"), v, "a positive integer")
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or not self.beta >= 0:
            raise bad("beta", self.beta, "a number ≥ 0")
        if self.objective != "grpo":
            return
        room = self.seq_len - self.max_completion_length
        if room < 8:  # dsft train refuses this too (GrpoObjective.encode)
            raise bad("max-completion-length", self.max_completion_length,
                      f"at most seq-len {self.seq_len} − 8, so prompt + completion fit in one sequence")
        if self.prompt_length is not None and self.prompt_length > room:
            raise bad("prompt-length", self.prompt_length,
                      f"at most {room} (seq-len {self.seq_len} − max-completion-length {self.max_completion_length})")

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
    def dropout(self) -> float:
        """LoRA dropout as the step runs it: DPO/ORPO/SimPO/GRPO set every dropout to 0 (disable_dropout)."""
        return self.lora_dropout if self.objective == "sft" else 0.0

    @property
    def pairs(self) -> bool:
        return self.objective in PAIR_OBJECTIVES

    @property
    def grpo(self) -> bool:
        return self.objective == "grpo"

    @property
    def rollout_prompt(self) -> int:
        """GRPO: prompt tokens of one rollout (default: all that seq_len leaves next to the completion)."""
        return self.prompt_length or self.seq_len - self.max_completion_length

    @property
    def rollout_len(self) -> int:
        """GRPO: tokens of one rollout, prompt + a completion at max_completion_length (≤ seq_len)."""
        return self.rollout_prompt + self.max_completion_length

    @property
    def sequences(self) -> int:
        """Sequences in one micro-batch's forward: SFT samples, 2 per pair (chosen + rejected, packed together by
        dsft's collate_pairs), G per prompt for GRPO (the loop's micro = micro-batch × num_generations)."""
        if self.pairs:
            return 2 * self.micro_batch
        if self.grpo:
            return self.micro_batch * self.num_generations
        return self.micro_batch

    @property
    def rows(self) -> int:
        """Rows of the forward's batch: one per sequence, or GRPO's rollouts packed into rows of seq_len."""
        if self.grpo and self.packing:
            return -(-self.sequences // max(1, self.seq_len // self.rollout_len))
        return self.sequences

    @property
    def row_len(self) -> int:
        """Width of one row (the S of attention masks and scores)."""
        if not self.grpo:
            return self.seq_len
        if not self.packing:
            return self.rollout_len
        return min(self.sequences, max(1, self.seq_len // self.rollout_len)) * self.rollout_len

    @property
    def tokens(self) -> int:
        """Token positions in one micro-batch's forward (every row at full width: the upper bound)."""
        return self.rows * self.row_len

    @property
    def labelled_tokens(self) -> float:
        """Tokens with a loss target in one micro-batch: GRPO's completions (all at full length), else
        label_fraction of the tokens."""
        if self.grpo:
            return min(self.label_fraction * self.tokens, self.sequences * self.max_completion_length)
        return self.tokens * self.label_fraction

    @property
    def reference_forward(self) -> bool:
        """Whether the step runs a no-grad reference forward inside the loss (DPO always, GRPO with beta > 0)."""
        return self.objective == "dpo" or (self.grpo and self.beta > 0)

    @property
    def reference_copy(self) -> bool:
        """Whether that reference is a frozen copy of the model (full/freeze); adapters just get disabled."""
        return self.reference_forward and not self.adapter

    @property
    def mts(self) -> bool:
        """Whether embeddings, LM head and norms train fully next to the adapter (dsft: tiny models)."""
        if not self.adapter:
            return False
        if self.modules_to_save is not None:
            return self.modules_to_save
        return self.trainer == "dsft" and self.arch.total_params() < 100e6



# ---- bytes per element -----------------------------------------------------------------------------------------
def act_bytes(req: PlanRequest) -> int:
    return 4 if req.precision == "fp32" else 2


def weight_bytes(req: PlanRequest) -> int:
    """Bytes per stored base weight (fp32 master weights under AMP)."""
    return 4 if req.precision in ("fp32", "amp-bf16", "amp-fp16") else 2


def shard_divisors(req: PlanRequest) -> tuple[int, int, int]:
    """Divisors for (optimizer state, gradients, parameters) per GPU under ZeRO / FSDP."""
    n = req.num_gpus
    s = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[req.sharding]
    return (n if s >= 1 else 1, n if s >= 2 else 1, n if s >= 3 else 1)


# ---- parameters ------------------------------------------------------------------------------------------------
MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj"})


def target_names(req: PlanRequest) -> set[str]:
    names = set(req.arch.linear_names())
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
    if not (req.adapter and req.arch.moe and req.arch.family.startswith("deepseek")) or fp8_base(req):
        return False
    if not target_names(req) & MLP_NAMES:
        return False
    return not (req.trainer == "dsft" and req.method == "dora")


def fp8_expert_lora(req: PlanRequest) -> bool:
    """Whether LoRA adapts the routed experts of an FP8 base: dsft loads them one FP8 expert MLP per expert (as
    DeepSeek ships them), so each expert's gate/up/down_proj is an ordinary PEFT LoRA linear — no fused W + ΔW."""
    return bool(req.adapter and req.arch.moe and fp8_base(req) and target_names(req) & MLP_NAMES)


def fp8_expert_adapter(req: PlanRequest) -> int:
    """LoRA (+ DoRA magnitude) params of one MoE layer's routed experts on an FP8 base: rank r per projection."""
    a, r = req.arch, req.rank
    dims = {"gate_proj": (a.hidden, a.moe_intermediate), "up_proj": (a.hidden, a.moe_intermediate),
            "down_proj": (a.moe_intermediate, a.hidden)}
    one = sum(r * (di + do) + (do if req.method == "dora" else 0)
              for n, (di, do) in dims.items() if n in target_names(req))
    return a.n_routed_experts * one


def targets(req: PlanRequest, i: int) -> list:
    names = target_names(req)
    peft_remap = fused_expert_lora(req) and req.trainer == "hf"
    return [lin for lin in req.arch.layer_linears(i)
            if lin.lora and lin.name in names and not (peft_remap and lin.group in ("mlp", "shared"))]


def fused_expert_adapter(req: PlanRequest) -> int:
    """LoRA params of one MoE layer's fused experts, rank r per expert (PEFT's remap doubles gate_up's rank)."""
    a, r, e = req.arch, req.rank, req.arch.n_routed_experts
    gate_up = (2 if req.trainer == "hf" else 1) * r * e * (a.hidden + 2 * a.moe_intermediate)
    return gate_up + r * e * (a.moe_intermediate + a.hidden)


def mts_params(req: PlanRequest) -> int:
    """Parameters of the modules trained fully next to LoRA (embeddings, LM head, norms)."""
    a = req.arch
    norms = a.hidden * (2 * a.layers + 1) + a.layers * a.attn_norm_params()
    return a.embed_params + a.head_params + norms


def layer_adapter(req: PlanRequest, i: int) -> int:
    r = req.rank
    n = sum(r * (lin.d_in + lin.d_out) + (lin.d_out if req.method == "dora" else 0) for lin in targets(req, i))
    if fused_expert_lora(req) and req.arch.is_moe_layer(i):
        n += fused_expert_adapter(req)
    if fp8_expert_lora(req) and req.arch.is_moe_layer(i):
        n += fp8_expert_adapter(req)
    return n


def adapter_params(req: PlanRequest) -> int:
    return sum(layer_adapter(req, i) for i in range(req.arch.layers)) + (mts_params(req) if req.mts else 0)


def packed_mask(req: PlanRequest) -> bool:
    """Packed rows through transformers' SDPA path get a (B,1,S,S) block-diagonal mask, which every layer's
    attention converts to a float bias and saves for backward (flash_attention_2 / dsft's CPU path avoid it)."""
    return req.packing and req.attn == "sdpa"


def freeze_first(req: PlanRequest) -> int:
    """Index of the first trainable layer under `freeze` (the last N layers train)."""
    return max(req.arch.layers - req.freeze_layers, 0)


def esft_selected(req: PlanRequest, i: int) -> int:
    """method esft: routed experts trained in layer i (0 in dense layers and for other methods)."""
    a = req.arch
    if req.method != "esft" or not a.is_moe_layer(i):
        return 0
    if isinstance(req.esft_experts, dict):
        return int(req.esft_experts.get(i, 0))
    if isinstance(req.esft_experts, int):
        return min(req.esft_experts, a.n_routed_experts)
    return min(a.n_routed_experts, max(1, math.ceil(req.esft_top_p * a.n_routed_experts - 1e-9)))


def esft_first(req: PlanRequest) -> int:
    """method esft: the first layer with trained experts (layers before it keep nothing for backward)."""
    return next((i for i in range(req.arch.layers) if esft_selected(req, i)), req.arch.layers)


def trainable_params(req: PlanRequest) -> int:
    a = req.arch
    if req.adapter:
        return adapter_params(req)
    if req.method == "esft":  # trainable copies of the selected experts' rows (dsft.train.esft.split_out)
        return sum(esft_selected(req, i) for i in range(a.layers)) * a.expert_params()
    if req.method == "freeze":
        return sum(a.layer_params(i) for i in range(freeze_first(req), a.layers))
    return a.total_params()


def fp8_base(req: PlanRequest) -> bool:
    """Whether frozen base weights stay in the checkpoint's FP8 blocks (adapters, or the frozen layers of freeze);
    full fine-tuning and QLoRA dequantize the checkpoint on load."""
    return bool(req.arch.fp8_block) and req.method in ("lora", "dora", "freeze")


def fp8_frozen_layers(req: PlanRequest) -> range:
    return range(req.arch.layers) if req.adapter else range(freeze_first(req))


def base_weight_bytes(req: PlanRequest) -> float:
    a = req.arch
    wb = weight_bytes(req)
    if fp8_base(req):
        from dsft.plan.checkpoint import fp8_layer

        kept = [fp8_layer(a, i) for i in fp8_frozen_layers(req)]
        # FP8 linears: 1 byte/param + float32 block scales; embeddings, head, norms, router in the weights' dtype
        return sum(b for _, b in kept) + (a.total_params() - sum(p for p, _ in kept)) * wb
    if req.method == "qlora":
        lin = sum(lin.params for i in range(a.layers) for lin in a.layer_linears(i))
        experts = sum(a.n_routed_experts * a.expert_params() for i in range(a.layers) if a.is_moe_layer(i))
        rest = a.total_params() - lin - experts
        # prepare_model_for_kbit_training upcasts what is not quantized (embeddings, LM head, norms) to fp32
        return (lin + experts) * QLORA_BYTES + rest * 4
    return a.total_params() * wb


def gathered_bytes_per_param(req: PlanRequest) -> float:
    """Bytes per parameter that ZeRO-3 / FSDP gather (16-bit working copies; the FP8 base as stored)."""
    if fp8_base(req) and req.adapter:
        b = req.arch.fp8_block or (128, 128)
        return 1 + 4 / (b[0] * b[1])
    wb = weight_bytes(req)
    return 2 if wb == 4 else (wb if req.method != "qlora" else QLORA_BYTES)
