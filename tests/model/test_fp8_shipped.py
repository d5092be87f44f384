"""The shipped-layout writer: FP8 V3 + MTP, BF16 sharded with/without MTP, V2-Lite shape — checked tensor by tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsft.model.shipped import INDEX_NAME, fuse_experts, split_experts, write_shipped


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    wmap = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(wmap.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(wmap)  # the index names every tensor and nothing else
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shipped")
    return {"fp8": write_shipped(root / "fp8"), "bf16": write_shipped(root / "bf16", variant="bf16"),
            "bf16-nomtp": write_shipped(root / "bf16-nomtp", variant="bf16", mtp=False),
            "v2-lite": write_shipped(root / "v2", shape="v2-lite", variant="bf16", mtp=False)}


def test_fp8_folder_has_the_shipped_layout(folders):
    d = folders["fp8"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["num_hidden_layers"] == 3
    assert cfg["hidden_size"] >= 256 and cfg["moe_intermediate_size"] % 128 != 0
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s.name) for s in shards)
    t = _tensors(d)
    n_layers, mtp = cfg["num_hidden_layers"], f"model.layers.{cfg['num_hidden_layers']}."
    # per-expert routed tensors, FP8 with per-block float32 scales (edge blocks: ceil)
    for layer in (1, 2, n_layers):
        for e in range(cfg["n_routed_experts"]):
            for proj, shape in (("gate_proj", (192, 256)), ("up_proj", (192, 256)), ("down_proj", (256, 192))):
                w = t[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
                s = t[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight_scale_inv"]
                assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == shape
                assert s.dtype == torch.float32 and tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
        assert t[f"model.layers.{layer}.mlp.gate.weight"].dtype == torch.bfloat16
        assert t[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj" not in t
    assert t["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn  # the dense layer
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert t[name].dtype == torch.bfloat16 and name + "_scale_inv" not in t
    # the MTP block as layer num_hidden_layers, in the last shard
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.q_a_proj.weight"):
        assert mtp + part in t
    assert t[mtp + "eh_proj.weight"].dtype == torch.float8_e4m3fn and t[mtp + "embed_tokens.weight"].dtype == torch.bfloat16
    wmap = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    assert {v for k, v in wmap.items() if k.startswith(mtp)} == {shards[-1].name}


def test_norms_look_trained_so_resolution_treats_it_as_pretrained(folders):
    from dsft.model.info import read_model_info

    info = read_model_info(str(folders["fp8"]))
    assert not info.random_init and 30e6 < info.params < 200e6


def test_bf16_variant_is_fp8_cast_bf16_of_the_same_weights(folders):
    q, b = _tensors(folders["fp8"]), _tensors(folders["bf16"])
    assert not any(k.endswith("_scale_inv") for k in b) and set(b) == {k for k in q if not k.endswith("_scale_inv")}
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    s = q[name + "_scale_inv"]  # the test's own dequantization: each 128×128 block × its scale, edge cut
    full = s.repeat_interleave(128, 0)[: q[name].shape[0]].repeat_interleave(128, 1)[:, : q[name].shape[1]]
    assert torch.equal(b[name], (q[name].float() * full).to(torch.bfloat16))
    assert torch.equal(b["model.embed_tokens.weight"], q["model.embed_tokens.weight"])
    cfg = json.loads((folders["bf16"] / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 1
    nomtp = _tensors(folders["bf16-nomtp"])
    assert not any(k.startswith("model.layers.3.") for k in nomtp) and set(nomtp) < set(b)
    assert json.loads((folders["bf16-nomtp"] / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_expert_mapping_both_ways_matches_transformers_loader(folders):
    """transformers' own conversion fuses the per-expert tensors exactly as dsft's fuse_experts does."""
    from transformers import AutoModelForCausalLM

    d = folders["bf16-nomtp"]
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    stored = _tensors(d)
    fused = fuse_experts(stored)
    for layer in (1, 2):
        for key in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{key}"
            assert torch.equal(model.state_dict()[name], fused[name])
    back = split_experts(fused)
    assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)


def test_v2_lite_shape_loads_with_plain_transformers_and_its_tokenizer(folders):
    from transformers import AutoModelForCausalLM

    from dsft.model.tokenizer import load_tokenizer

    d = folders["v2-lite"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["q_lora_rank"] is None and cfg["n_shared_experts"] == 2
    t = _tensors(d)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in t and "model.layers.1.self_attn.q_proj.weight" in t
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in t
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    tok = load_tokenizer(str(d))
    ids = tok.apply_chat_template([{"role": "user", "content": "头痛怎么办"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_real_deepseek_v3_tokenizer_and_template(folders):
    from dsft.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(folders["fp8"]))
    assert len(tok) > 128_000 and tok.bos_token == "<｜begin▁of▁sentence｜>"
    text = tok.apply_chat_template([{"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "休息"}],
                                   tokenize=False)
    assert "<｜User｜>头痛怎么办<｜Assistant｜>休息<｜end▁of▁sentence｜>" in text


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="V2-Lite ships BF16"):
        write_shipped(tmp_path / "x", shape="v2-lite")
    with pytest.raises(ValueError, match="variant"):
        write_shipped(tmp_path / "x", variant="int4")
