"""Fixtures for config tests: real model folders (tiny, random-init or with trained norms) and a sparse 1.8 B one."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest


def _tiny_llama(out: Path, *, pretrained: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    if pretrained:  # what training leaves behind: norm weights that are no longer their initial ones
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def random_init_llama(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("llama-random"), pretrained=False)


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("llama-trained"), pretrained=True)


@pytest.fixture(scope="session")
def r1_distill_1p5b(tmp_path_factory) -> Path:
    """A real safetensors file with R1-Distill-Qwen-1.5B's tensor shapes (1.78 B parameters), sparse on disk:
    only the norm weights hold real (trained-looking) bytes; resolution reads nothing else."""
    out = tmp_path_factory.mktemp("r1-distill-qwen-1.5b")
    h, inter, vocab, layers, kv = 1536, 8960, 151936, 28, 256
    shapes: dict[str, list[int]] = {"model.norm.weight": [h], "model.embed_tokens.weight": [vocab, h],
                                    "lm_head.weight": [vocab, h]}
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes.update({pre + "input_layernorm.weight": [h], pre + "post_attention_layernorm.weight": [h],
                       pre + "self_attn.q_proj.weight": [h, h], pre + "self_attn.k_proj.weight": [kv, h],
                       pre + "self_attn.v_proj.weight": [kv, h], pre + "self_attn.o_proj.weight": [h, h],
                       pre + "mlp.gate_proj.weight": [inter, h], pre + "mlp.up_proj.weight": [inter, h],
                       pre + "mlp.down_proj.weight": [h, inter]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path = out / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        start = f.tell()
        for name in (n for n in shapes if n.endswith("norm.weight")):
            f.seek(start + header[name]["data_offsets"][0])
            f.write(bytes((i * 37 + 11) % 251 for i in range(2 * shapes[name][0])))
        f.truncate(start + offset)
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": h}), encoding="utf-8")
    return out
