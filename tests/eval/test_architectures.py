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
    if kind == "gemma3":  # sliding-window layers with a window shorter than the prompts below
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                                        layer_types=["sliding_attention", "full_attention"]))
    if kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, q_lora_rank=32, kv_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                  topk_group=1, first_k_dense_replace=1)
        return tf.DeepseekV3ForCausalLM(cfg)
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


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "deepseek_v2", "deepseek_v3"])
def test_shared_prompt_label_scores_equal_pairwise(kind):
    """Label scoring runs each prompt once and its labels on the repeated KV cache: the same log-probs as scoring
    every (prompt, label) pair on its own, labels of different lengths included, with and without a max_length
    that cuts the prompt from the left."""
    tok = load_tokenizer(str(embedded_tokenizer_dir()))
    torch.manual_seed(0)
    model = _tiny(kind, len(tok), tok).eval()
    labels = ["消化科", "神经内科", "内分泌科", "心", "呼吸与危重症医学科"]
    prompts = [m for m, _ in (prompt_and_reference(r) for r in real_records(3))]
    groups = [(P._ids(tok, P.prompt_text(tok, m)), [P._ids(tok, P.continuation_text(tok, m, lab)[1]) for lab in labels])
              for m in prompts]
    groups[1] = (groups[1][0], groups[1][1][:2])  # prompts with different numbers of continuations in one batch
    assert len({len(c) for c in groups[0][1]}) > 1 and min(len(p) for p, _ in groups) > 16
    assert len({len(p) for p, _ in groups}) == len(groups)  # different prompt lengths: left padding in the batch
    for max_length in (None, 24):
        shared = P.shared_prefix_logprobs(model, tok, groups, max_length=max_length, progress=None)
        # with max_length every label of a prompt sees the same prompt window (the one the longest label leaves),
        # so the labels compete on equal terms; the pairwise scorer would cut each pair on its own
        cut = groups if max_length is None else [(p[-(max_length - max(map(len, cs))):], cs) for p, cs in groups]
        pairwise = P.continuation_logprobs(model, tok, [(p, c) for p, cs in cut for c in cs], batch_size=1,
                                           progress=None)
        flat = [x for r in shared for x in r]
        assert [k for _, k in flat] == [k for _, k in pairwise]
        for (a, _), (b, _) in zip(flat, pairwise, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
