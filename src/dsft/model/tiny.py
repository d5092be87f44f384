"""Build the embedded default: a tiny random-init DeepSeek-V3 (MLA + MoE) with DeepSeek's template."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from dsft.errors import ModelError
from dsft.model.paths import dsft_home
from dsft.model.tokenizer import embedded_tokenizer_dir

TINY_VERSION = "v2"  # v2: config.json names the router (topk_method, scoring_func) as DeepSeek-V3's does

# Shape: 4 layers, hidden 128, MLA (q_lora 64, kv_lora 32), layer 0 dense, layers 1-3 MoE with 4 routed
# experts (top-2) + 1 shared expert. ≈ 3 M parameters with the 8 k demo vocabulary.
TINY_V3_KWARGS = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1, max_position_embeddings=2048,
    tie_word_embeddings=False, initializer_range=0.02,
    # what transformers' DeepseekV3 router always does; DeepSeek-V3's own config.json says so, and vLLM reads these
    # (without topk_method it builds no e_score_correction_bias and fails loading the checkpoint with a KeyError)
    topk_method="noaux_tc", scoring_func="sigmoid",
)
# MLA sizes vLLM's CPU MLA kernel supports (it compiles only for DeepSeek-V3's latent 512 + rope 64 = 576):
# build_tiny_deepseek_v3(dir, **VLLM_CPU_MLA) gives a tiny V3 that vLLM's CPU build serves.
VLLM_CPU_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64)


def build_tiny_deepseek_v3(out_dir: str | Path, *, seed: int = 0, tokenizer_dir: str | Path | None = None, **overrides) -> Path:
    """Write a random-init tiny DeepseekV3ForCausalLM + the demo tokenizer to out_dir (safetensors)."""
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or embedded_tokenizer_dir()))
    kwargs = {**TINY_V3_KWARGS, **overrides}
    cfg = DeepseekV3Config(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def embedded_model_dir() -> Path:
    """The cached embedded model folder; built once (atomically) on first use."""
    dest = dsft_home() / "models" / f"tiny-deepseek-v3-{TINY_VERSION}"
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.", dir=dest.parent))
    try:
        build_tiny_deepseek_v3(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # built concurrently by another process, or an incomplete folder is in the way
            if not (dest / "config.json").exists():
                broken = dest.with_name(f".{dest.name}.broken-{os.getpid()}")
                with contextlib.suppress(OSError):
                    os.replace(dest, broken)
                    shutil.rmtree(broken, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (dest / "config.json").exists():
        raise ModelError(f"{dest}: the embedded model folder is incomplete (no config.json); delete it and retry")
    return dest
