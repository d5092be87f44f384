"""Helpers for the ESFT tests: tiny V2- and V3-shape DeepSeek MoE folders (8 routed experts, top-2) with the
embedded tokenizer, and a run directory on real medical records."""

from __future__ import annotations

from pathlib import Path

import torch

MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
           max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1)


def build_moe(out: Path, kind: str = "deepseek_v3", seed: int = 0, **overrides) -> Path:
    """A random-init tiny DeepSeek MoE folder: layer 0 dense, layers 1–2 MoE, 8 routed experts + 1 shared."""
    import transformers as tf

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = tf.AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    kw = {**MOE, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id, **overrides}
    if kind == "deepseek_v2":  # V2-Lite shape: no q LoRA, softmax router, greedy top-k
        cfg = tf.DeepseekV2Config(q_lora_rank=None, topk_method="greedy", **kw)
        cls = tf.DeepseekV2ForCausalLM
    else:
        cfg = tf.DeepseekV3Config(q_lora_rank=32, topk_method="noaux_tc", scoring_func="sigmoid", **kw)
        cls = tf.DeepseekV3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
