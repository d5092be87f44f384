"""DeepSeek-V3.2 as shipped (FP8 blocks, MTP, plus DeepSeek Sparse Attention's indexer in every layer): loads with
the FP8 linears kept e4m3 (the indexer's wq_b/wk included), logits equal a plain-torch FP32 dequantization, and the
sparse path is really taken (index_topk below the prompt length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_fp8_load import IDS, reference_state

from dsft.model.base_checkpoint import describe, read_base_checkpoint
from dsft.model.fp8_linear import fp8_modules, fp8_resident_bytes
from dsft.model.load import load_model
from dsft.model.shipped import write_shipped


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory) -> Path:
    return write_shipped(tmp_path_factory.mktemp("v32") / "v3.2", shape="v3.2")


@pytest.fixture(scope="module")
def v32(v32_dir):
    return load_model(v32_dir, dtype="float32")


def _reference(folder: Path, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder))
    del cfg.quantization_config
    for k, v in overrides.items():
        setattr(cfg, k, v)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(reference_state(folder), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref.eval()


def test_v32_loads_fp8_with_the_indexer_and_matches_a_plain_fp32_dequantization(v32_dir, v32):
    assert type(v32).__name__ == "DeepseekV32ForCausalLM"
    names = {n for n, _ in fp8_modules(v32)}
    assert {"model.layers.1.self_attn.indexer.wq_b", "model.layers.1.self_attn.indexer.wk",
            "model.layers.2.mlp.experts.3.down_proj"} <= names
    assert "model.layers.1.self_attn.indexer.weights_proj" not in names  # stored unquantized, as DeepSeek ships it
    held, params = fp8_resident_bytes(v32)
    assert held / params < 1.01
    assert describe(read_base_checkpoint(v32_dir)) == "FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept, 3 shards"
    with torch.no_grad():
        want, got = _reference(v32_dir)(IDS).logits, v32(IDS).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_the_sparse_attention_path_is_taken(v32_dir, v32):
    """index_topk 4 < 10 prompt tokens: every query attends to at most 4 keys, so a dense model (index_topk ≥ the
    prompt) gives other logits — the test above compares the sparse path, not plain MLA."""
    with torch.no_grad():
        dense = _reference(v32_dir, index_topk=64)(IDS).logits
        sparse = v32(IDS).logits
    assert (dense - sparse)[:, 4:].abs().max() > 1e-3  # positions past the first 4 keys differ
    torch.testing.assert_close(dense[:, :4], sparse[:, :4], atol=2e-5, rtol=1e-5)  # ≤ 4 keys: identical


def test_lora_attaches_to_v32_fp8_linears_but_not_the_indexer(v32):
    import copy

    from dsft.config import LoraConfig
    from dsft.model.adapters import attach_lora

    pm, targets = attach_lora(copy.deepcopy(v32), LoraConfig(r=4, dropout=0.0))
    assert "model.layers.2.mlp.experts.3.up_proj" in targets.modules
    assert not any("indexer" in m for m in targets.modules)  # the indexer runs under no_grad: nothing to train there
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, v32(IDS).logits)


def test_packed_rows_equal_one_sample_at_a_time_through_the_indexer(v32):
    """The indexer picks its top-k keys under the packed block-diagonal mask, so packing leaks nothing: per-sample
    losses of packed rows equal the samples alone (and a row read as one long sequence differs: the check can fail).
    The tiny model has 8 indexer heads: with 2, keys whose ReLU'd scores are all 0 tie exactly, and torch.topk breaks
    such ties differently for rows of different lengths (no leak, but not comparable bit for bit)."""
    from dsft.train.batching import collate_packed, collate_padded
    from dsft.train.loss import CausalLMLoss, per_sample_losses
    from dsft.train.setup import IGNORE, Encoded

    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (12, 20, 9, 30, 16, 25):
        ids = torch.randint(10, 120000, (n,), generator=g).tolist()
        exs.append(Encoded(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    lm = CausalLMLoss(v32.eval())
    packed = collate_packed(exs, capacity=64, pad_id=0)
    assert packed["input_ids"].shape[0] < len(exs)
    got = per_sample_losses(lm, packed)
    alone = [per_sample_losses(lm, collate_padded([e], 0))[0] for e in exs]
    assert max(abs(got[i] - alone[i]) for i in range(len(exs))) <= 1e-5
    leaky = dict(packed)
    w = packed["input_ids"].shape[1]
    leaky["position_ids"] = torch.arange(w).expand_as(packed["position_ids"]).contiguous()
    bad = per_sample_losses(lm, leaky)
    assert max(abs(bad[i] - got[i]) for i in range(len(exs))) > 1e-3


def test_segments_attention_is_refused_for_v32(v32):
    from dsft.config import config_from_dict
    from dsft.errors import TrainError
    from dsft.train.recipe import _packed_attention

    tc = config_from_dict({"train": {"packing": True, "packed_attention": "segments"}}).train
    with pytest.raises(TrainError, match="needs the attention mask"):
        _packed_attention(v32, tc, torch.device("cpu"))
    auto = config_from_dict({"train": {"packing": True}}).train
    assert _packed_attention(v32, auto, torch.device("cpu")) is None and v32.config._attn_implementation == "sdpa"
