"""Auto LoRA targets per architecture: MLA projections, layer-0 dense MLP, shared + routed experts; router frozen."""

from __future__ import annotations

import pytest
import torch

from dsft.config import LoraConfig
from dsft.model.adapters import adapted_module_names, attach_lora

ATTN_V3 = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _build(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                  topk_group=1)
        return tf.DeepseekV3ForCausalLM(cfg)
    if kind == "deepseek_v2":  # V2-Lite shape: no q LoRA (plain q_proj)
        cfg = tf.DeepseekV2Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                  topk_group=1)
        return tf.DeepseekV2ForCausalLM(cfg)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _expected(kind: str) -> list[str]:
    if kind == "deepseek_v3":
        return ([f"model.layers.0.self_attn.{p}" for p in ATTN_V3] + [f"model.layers.0.mlp.{p}" for p in MLP]
                + [f"model.layers.1.self_attn.{p}" for p in ATTN_V3] + ["model.layers.1.mlp.experts"]
                + [f"model.layers.1.mlp.shared_experts.{p}" for p in MLP])
    if kind == "deepseek_v2":
        attn = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        return ([f"model.layers.0.self_attn.{p}" for p in attn] + [f"model.layers.0.mlp.{p}" for p in MLP]
                + [f"model.layers.1.self_attn.{p}" for p in attn] + ["model.layers.1.mlp.experts"]
                + [f"model.layers.1.mlp.shared_experts.{p}" for p in MLP])
    return [f"model.layers.{i}.{blk}.{p}" for i in range(2)
            for blk, ps in (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", MLP)) for p in ps]


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "qwen2"])
def test_auto_targets_per_architecture(kind):
    pm, targets = attach_lora(_build(kind), LoraConfig(r=4))
    assert sorted(adapted_module_names(pm)) == sorted(_expected(kind))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert not any(".mlp.gate." in n for n in trainable)  # the router stays frozen
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    if kind.startswith("deepseek"):
        assert sorted(targets.parameters) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
        assert any("experts" in n and "lora_A" in n for n in trainable)
        # the expert LoRA really changes the MoE output once B ≠ 0
        x = torch.randint(0, 256, (1, 12))
        with torch.no_grad():
            before = pm(x, use_cache=False).logits
            for n, p in pm.named_parameters():
                if "experts" in n and "lora_B" in n:
                    p.normal_(0, 0.5)
            assert not torch.equal(before, pm(x, use_cache=False).logits)


def test_explicit_target_list_and_dora_skips_experts():
    pm, t = attach_lora(_build("deepseek_v3"), LoraConfig(r=4, target_modules=["kv_b_proj", "gate_proj"]))
    assert sorted(adapted_module_names(pm)) == sorted(
        ["model.layers.0.self_attn.kv_b_proj", "model.layers.1.self_attn.kv_b_proj", "model.layers.0.mlp.gate_proj",
         "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.experts"])
    pm, t = attach_lora(_build("deepseek_v3"), LoraConfig(r=4, use_dora=True))
    assert not t.parameters and any("experts" in k for k in t.skipped)
    assert "model.layers.1.mlp.shared_experts.up_proj" in adapted_module_names(pm)
