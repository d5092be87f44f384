"""Predictors on each supported architecture family (Llama, Qwen2, DeepSeek-V2): padding must not change results."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import real_records

from dsft.eval import predict as P
from dsft.model.tokenizer import embedded_tokenizer_dir, load_tokenizer
from dsft.records import prompt_and_reference


def _tiny(kind: str, vocab: int, tok):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    cfg = tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    return tf.DeepseekV2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "deepseek_v2"])
def test_padding_invariance(kind):
    tok = load_tokenizer(str(embedded_tokenizer_dir()))
    torch.manual_seed(0)
    model = _tiny(kind, len(tok), tok).eval()
    items = [prompt_and_reference(r) for r in real_records(5)]
    batched = P.answer_loss(model, tok, items, batch_size=5)
    single = P.answer_loss(model, tok, items, batch_size=1)
    for a, b in zip(batched["per_item"], single["per_item"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    prompts = [m for m, _ in items]
    g5 = P.generate(model, tok, prompts, P.GenerationSettings(max_new_tokens=6, batch_size=5))["texts"]
    g1 = P.generate(model, tok, prompts, P.GenerationSettings(max_new_tokens=6, batch_size=1))["texts"]
    assert g5 == g1
