"""Model architectures the planner knows: built-in DeepSeek configs, any local config.json, exact param counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsft.errors import ConfigError
from dsft.report.numbers import fmt_count  # noqa: F401  (re-exported for plan modules)


@dataclass(frozen=True)
class Linear:
    """One nn.Linear per layer (or per expert): a LoRA target when `lora` is True."""

    name: str
    d_in: int
    d_out: int
    group: str  # attn | mlp | shared | expert
    bias: bool = False
    lora: bool = True

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only causal LM (Llama / Qwen2 / DeepSeek-V2/V3 with MLA + MoE)."""

    name: str
    family: str  # llama | qwen2 | deepseek_v2 | deepseek_v3
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 0
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position: int = 4096
    # MLA (DeepSeek-V2/V3); kv_lora_rank 0 means standard multi-head / grouped-query attention
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE (DeepSeek-V2/V3); n_routed_experts 0 means dense
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    # DeepSeek Sparse Attention's indexer (DeepSeek-V3.2): heads × head dim of its q, 0 = no indexer
    index_heads: int = 0
    index_head_dim: int = 0
    # the checkpoint as stored: dtype, FP8 block quantization (DeepSeek-V3/R1/V3.1 ship float8_e4m3fn linears with a
    # float32 weight_scale_inv per block), multi-token-prediction layers stored after the decoder layers
    dtype: str = "bfloat16"
    fp8_block: tuple[int, int] | None = None
    mtp_layers: int = 0
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)
    """Derived shapes and counts (the planner asks for them thousands of times per plan; the fields are frozen)."""

    def cached(self, key: Any, compute: Any) -> Any:
        """compute() once per Arch and key (the fields are frozen, so derived values never go stale)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ---- shape helpers ---------------------------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection output (all heads)."""
        return self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim) if self.mla else self.heads * self.hd

    @property
    def k_dim(self) -> int:
        """Width of the key states fed to attention (after MLA expansion / before GQA repeat)."""
        return self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim) if self.mla else self.kv_heads * self.hd

    @property
    def v_dim(self) -> int:
        return self.heads * self.v_head_dim if self.mla else self.kv_heads * self.hd

    @property
    def o_dim(self) -> int:
        """Width of the attention output (input of o_proj)."""
        return self.heads * self.v_head_dim if self.mla else self.heads * self.hd

    def is_moe_layer(self, i: int) -> bool:
        return self.moe and i >= self.first_k_dense and i % max(self.moe_layer_freq, 1) == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    @property
    def n_dense_layers(self) -> int:
        return self.layers - self.n_moe_layers

    # ---- modules ---------------------------------------------------------------------------------------------
    def attn_linears(self) -> list[Linear]:
        h = self.hidden
        if not self.mla:
            return [
                Linear("q_proj", h, self.q_dim, "attn", self.qkv_bias),
                Linear("k_proj", h, self.kv_heads * self.hd, "attn", self.qkv_bias),
                Linear("v_proj", h, self.kv_heads * self.hd, "attn", self.qkv_bias),
                Linear("o_proj", self.q_dim, h, "attn"),
            ]
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        out: list[Linear] = []
        if self.q_lora_rank:
            out += [Linear("q_a_proj", h, self.q_lora_rank, "attn"), Linear("q_b_proj", self.q_lora_rank, self.heads * qk, "attn")]
        else:
            out += [Linear("q_proj", h, self.heads * qk, "attn")]
        out += [
            Linear("kv_a_proj_with_mqa", h, self.kv_lora_rank + self.qk_rope_head_dim, "attn"),
            Linear("kv_b_proj", self.kv_lora_rank, self.heads * (self.qk_nope_head_dim + self.v_head_dim), "attn"),
            Linear("o_proj", self.heads * self.v_head_dim, h, "attn"),
        ]
        if self.index_heads:  # V3.2's indexer: runs without gradients, never a LoRA target
            out += [Linear("wq_b", self.q_lora_rank or h, self.index_heads * self.index_head_dim, "indexer", lora=False),
                    Linear("wk", h, self.index_head_dim, "indexer", lora=False),
                    Linear("weights_proj", h, self.index_heads, "indexer", lora=False)]
        return out

    def attn_norm_params(self) -> int:
        if not self.mla:
            return 0
        return self.kv_lora_rank + (self.q_lora_rank or 0)

    def mlp_linears(self, width: int, group: str) -> list[Linear]:
        h = self.hidden
        return [Linear("gate_proj", h, width, group), Linear("up_proj", h, width, group), Linear("down_proj", width, h, group)]

    def layer_linears(self, i: int) -> tuple[Linear, ...]:
        """Linear modules of layer i that PEFT can target (routed experts are fused 3-D params, not targets)."""
        moe = self.is_moe_layer(i)
        return self.cached(("linears", moe), lambda: _kind_linears(self, moe))

    def linear_names(self) -> frozenset[str]:
        """Names of the targetable linears over all layers (dense and MoE)."""
        return self.cached("names", lambda: frozenset(
            lin.name for moe in {self.is_moe_layer(i) for i in range(self.layers)} for lin in _kind_linears(self, moe)))

    def largest_linear(self) -> int:
        """Parameters of the largest targetable linear in any layer."""
        return self.cached("largest", lambda: max(lin.params for i in range(self.layers) for lin in self.layer_linears(i)))

    # ---- parameter counts ------------------------------------------------------------------------------------
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return 3 * self.hidden * self.moe_intermediate

    def layer_params(self, i: int, *, active: bool = False) -> int:
        moe = self.is_moe_layer(i)
        return self.cached(("params", moe, active), lambda: _kind_params(self, moe, active))

    def mtp_params(self) -> int:
        """Parameters of the multi-token-prediction layers (DeepSeek-V3: enorm, hnorm, eh_proj, one MoE decoder
        layer, shared_head norm + head, and its own copy of embed_tokens), stored after the decoder layers."""
        h = self.hidden
        last = self.layers - 1
        one = 3 * h + 2 * h * h + self.layer_params(last) + 2 * self.vocab * h
        return self.mtp_layers * one

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    def total_params(self) -> int:
        return self.cached("total", lambda: self.embed_params + self.head_params + self.hidden
                           + sum(self.layer_params(i) for i in range(self.layers)))

    def active_params(self) -> int:
        """Parameters used per token in matmuls: no input embedding, only the routed experts a token visits."""
        head = self.vocab * self.hidden
        return self.cached("active", lambda: head + self.hidden
                           + sum(self.layer_params(i, active=True) for i in range(self.layers)))

    def summary(self) -> str:
        kind = "MLA" if self.mla else ("GQA" if self.kv_heads != self.heads else "MHA")
        moe = f", MoE {self.n_routed_experts}×{self.experts_per_token} routed + {self.n_shared_experts} shared" if self.moe else ""
        return (f"{self.name}: {self.family}, {self.layers} layers, hidden {self.hidden}, {kind}{moe}, vocab {self.vocab}; "
                f"{fmt_count(self.total_params())} params ({fmt_count(self.active_params())} active)")


def _kind_linears(arch: Arch, moe: bool) -> tuple[Linear, ...]:
    """The linears of a dense or an MoE layer."""
    lin = arch.attn_linears()
    if moe:
        if arch.n_shared_experts:
            lin += arch.mlp_linears(arch.moe_intermediate * arch.n_shared_experts, "shared")
    else:
        lin += arch.mlp_linears(arch.intermediate, "mlp")
    return tuple(lin)


def _kind_params(arch: Arch, moe: bool, active: bool) -> int:
    n = 2 * arch.hidden + arch.attn_norm_params() + sum(lin.params for lin in _kind_linears(arch, moe))
    n += 2 * arch.index_head_dim  # V3.2's indexer LayerNorm (weight + bias; no gradient reaches it)
    if moe:
        n += arch.n_routed_experts * arch.hidden  # router
        k = arch.experts_per_token if active else arch.n_routed_experts
        n += k * arch.expert_params()
    return n


# ---- built-in architectures (values from each model's public config.json) --------------------------------------
def _llama(name, vocab, h, layers, heads, kv, inter, max_pos, family="llama", tie=False, bias=False) -> Arch:
    return Arch(name=name, family=family, vocab=vocab, hidden=h, layers=layers, heads=heads, kv_heads=kv,
                intermediate=inter, tie_embeddings=tie, qkv_bias=bias, max_position=max_pos)


BUILTIN: dict[str, Arch] = {
    a.name: a for a in [
        _llama("deepseek-llm-7b", 102400, 4096, 30, 32, 32, 11008, 4096),
        _llama("deepseek-llm-67b", 102400, 8192, 95, 64, 8, 22016, 4096),
        # the seed's "13B" class: DeepSeek published no 13B model, so a Llama-shape DeepSeek-LLM at Llama-2-13B's
        # dims (hidden 5120, 40 layers, 40 heads, MLP 13824) with DeepSeek-LLM's 102,400-token vocabulary: 13.7B
        _llama("deepseek-13b", 102400, 5120, 40, 40, 40, 13824, 4096),
        _llama("deepseek-coder-1.3b", 32256, 2048, 24, 16, 16, 5504, 16384),
        _llama("deepseek-coder-6.7b", 32256, 4096, 32, 32, 32, 11008, 16384),
        _llama("deepseek-coder-33b", 32256, 7168, 62, 56, 8, 19200, 16384),
        Arch(name="deepseek-v2-lite", family="deepseek_v2", vocab=102400, hidden=2048, layers=27, heads=16, kv_heads=16,
             intermediate=10944, max_position=163840, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, experts_per_token=6,
             moe_intermediate=1408, first_k_dense=1),
        Arch(name="deepseek-v2", family="deepseek_v2", vocab=102400, hidden=5120, layers=60, heads=128, kv_heads=128,
             intermediate=12288, max_position=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2, experts_per_token=6,
             moe_intermediate=1536, first_k_dense=1),
        Arch(name="deepseek-v3", family="deepseek_v3", vocab=129280, hidden=7168, layers=61, heads=128, kv_heads=128,
             intermediate=18432, max_position=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, experts_per_token=8,
             moe_intermediate=2048, first_k_dense=3, fp8_block=(128, 128), mtp_layers=1),
        # DeepSeek-V3.2(-Exp): V3 + DeepSeek Sparse Attention's indexer (64 heads × 128, top-2048 keys) in every layer
        Arch(name="deepseek-v3.2", family="deepseek_v3", vocab=129280, hidden=7168, layers=61, heads=128, kv_heads=128,
             intermediate=18432, max_position=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, experts_per_token=8,
             moe_intermediate=2048, first_k_dense=3, fp8_block=(128, 128), mtp_layers=1, index_heads=64,
             index_head_dim=128),
        # what DeepSeek's fp8_cast_bf16.py makes of the shipped checkpoint (MTP layer still there)
        Arch(name="deepseek-v3-bf16", family="deepseek_v3", vocab=129280, hidden=7168, layers=61, heads=128,
             kv_heads=128, intermediate=18432, max_position=163840, q_lora_rank=1536, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
             experts_per_token=8, moe_intermediate=2048, first_k_dense=3, mtp_layers=1),
        _llama("r1-distill-qwen-1.5b", 151936, 1536, 28, 12, 2, 8960, 131072, family="qwen2", bias=True),
        _llama("r1-distill-qwen-7b", 152064, 3584, 28, 28, 4, 18944, 131072, family="qwen2", bias=True),
        _llama("r1-distill-qwen-14b", 152064, 5120, 48, 40, 8, 13824, 131072, family="qwen2", bias=True),
        _llama("r1-distill-qwen-32b", 152064, 5120, 64, 40, 8, 27648, 131072, family="qwen2", bias=True),
        _llama("r1-distill-llama-8b", 128256, 4096, 32, 32, 8, 14336, 131072),
        _llama("r1-distill-llama-70b", 128256, 8192, 80, 64, 8, 28672, 131072),
    ]
}
ALIASES = {
    "deepseek-llm-7b-base": "deepseek-llm-7b", "deepseek-llm-7b-chat": "deepseek-llm-7b",
    "deepseek-llm-67b-base": "deepseek-llm-67b", "deepseek-llm-67b-chat": "deepseek-llm-67b",
    "deepseek-coder-1.3b-base": "deepseek-coder-1.3b", "deepseek-coder-1.3b-instruct": "deepseek-coder-1.3b",
    "deepseek-coder-6.7b-base": "deepseek-coder-6.7b", "deepseek-coder-6.7b-instruct": "deepseek-coder-6.7b",
    "deepseek-coder-33b-base": "deepseek-coder-33b", "deepseek-coder-33b-instruct": "deepseek-coder-33b",
    "deepseek-v2-lite-chat": "deepseek-v2-lite", "deepseek-v2-chat": "deepseek-v2", "deepseek-v3-base": "deepseek-v3",
    "deepseek-r1": "deepseek-v3", "deepseek-r1-0528": "deepseek-v3", "deepseek-v3-0324": "deepseek-v3",
    "deepseek-v3.1": "deepseek-v3", "deepseek-v3.1-base": "deepseek-v3", "deepseek-v3.1-terminus": "deepseek-v3",
    "deepseek-v3.2-exp": "deepseek-v3.2",
    # the seed's size classes (its hardware table: 7B → 1 × A100-40GB, 13B → 2 ×, 34B → 4 ×)
    "deepseek-7b": "deepseek-llm-7b", "deepseek-34b": "deepseek-coder-33b",
    "deepseek-r1-distill-qwen-1.5b": "r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b": "r1-distill-qwen-7b",
    "deepseek-r1-distill-qwen-14b": "r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b": "r1-distill-qwen-32b",
    "deepseek-r1-distill-llama-8b": "r1-distill-llama-8b", "deepseek-r1-distill-llama-70b": "r1-distill-llama-70b",
}


def builtin_names() -> list[str]:
    return list(BUILTIN)


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _fp8_block(quant: Any, source: str) -> tuple[int, int] | None:
    """(rows, cols) of the FP8 scale blocks from config.json's quantization_config (None: not FP8-quantized)."""
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: quantization_config: expected an object, got {type(quant).__name__}")
    if str(quant.get("quant_method", "")).lower() != "fp8":
        return None
    block = quant.get("weight_block_size") or [128, 128]
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: quantization_config.weight_block_size {block!r}: expected two positive integers "
                          f"such as [128, 128]")
    return int(block[0]), int(block[1])


def arch_from_hf_config(cfg: dict, name: str = "local", source: str = "config.json") -> Arch:
    """Read a Hugging Face config.json dict (llama / qwen2 / mistral / deepseek_v2 / deepseek_v3 shapes)."""
    cfg = dict(cfg.get("text_config") or cfg) if "hidden_size" not in cfg else cfg
    mtype = str(cfg.get("model_type", "llama"))
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: missing or bad key {err} (expected a causal-LM config.json with hidden_size, "
                          f"num_hidden_layers, num_attention_heads, vocab_size)") from err
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    inter = int(_get(cfg, "intermediate_size", default=4 * h))
    family = mtype if mtype in ("qwen2", "deepseek_v2", "deepseek_v3") else ("deepseek_v3" if mtype.startswith("deepseek_v") else "llama")
    kw: dict[str, Any] = dict(
        name=name, family=family, vocab=vocab, hidden=h, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
        head_dim=int(cfg.get("head_dim") or 0) if family in ("llama", "qwen2") else 0,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) or mtype == "qwen2",
        max_position=int(cfg.get("max_position_embeddings") or 4096), source=source,
        dtype=str(_get(cfg, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", ""),
        fp8_block=_fp8_block(cfg.get("quantization_config"), source),
        mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
    )
    if family.startswith("deepseek"):
        kw.update(
            q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0), qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
            v_head_dim=int(cfg.get("v_head_dim") or 0),
            n_routed_experts=int(cfg.get("n_routed_experts") or 0), n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate=int(cfg.get("moe_intermediate_size") or 0),
            first_k_dense=int(cfg.get("first_k_dense_replace") or 0), moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
        )
    if mtype == "deepseek_v32":  # DeepSeek Sparse Attention's indexer (transformers' defaults: 64 heads × 128)
        kw.update(index_heads=int(cfg.get("index_n_heads") or 64), index_head_dim=int(cfg.get("index_head_dim") or 128))
    return Arch(**kw)


def resolve_arch(model: str) -> Arch:
    """A built-in name (or alias), a model folder with config.json, or a config.json path → Arch."""
    key = model.strip()
    low = key.lower().split("/")[-1] if not Path(key).expanduser().exists() else ""
    if low in BUILTIN or low in ALIASES:
        return BUILTIN[ALIASES.get(low, low)]
    p = Path(key).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file() and p.suffix.lower() != ".gguf":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{p}: not a readable JSON config ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        arch = arch_from_hf_config(raw, name=p.parent.name or "local", source=str(p))
        from dsft.plan.checkpoint import read_index

        info = read_index(p.parent, arch)  # shards, total size, FP8 scales and MTP tensors the folder stores
        if info:
            if info["mtp_layers_stored"] < arch.mtp_layers:  # e.g. a transformers save: MTP dropped, config kept
                arch = replace(arch, mtp_layers=info["mtp_layers_stored"], extra={})
            arch.extra["checkpoint"] = info
        return arch
    if key.startswith("embedded:") or key.lower().endswith(".gguf"):
        from dsft.model.load import resolve_model_dir

        d = resolve_model_dir(key)
        return arch_from_hf_config(json.loads((d / "config.json").read_text(encoding="utf-8")), name=key, source=str(d))
    raise ConfigError(f"unknown model {model!r} (accepted: a folder or config.json path, or one of "
                      f"{', '.join(builtin_names())})")


def with_overrides(arch: Arch, **kw: Any) -> Arch:
    return replace(arch, **kw)
