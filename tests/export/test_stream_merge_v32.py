"""DeepSeek-V3.2 as shipped (FP8 + the sparse-attention indexer + MTP), end to end through the CLI: `dsft train`
LoRA on the frozen e4m3 base → `dsft export` merged FP8 (loads back with dsft, close to base + adapter) and merged
BF16 (plain transformers' DeepseekV32ForCausalLM); the MTP tensors and the indexer's tensors as the input's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_stream_merge import read_all
from test_stream_merge_e2e import IDS, PLAIN, _close, _dsft, _plain

from dsft.model import fp8

pytestmark = pytest.mark.slow


def _dense(model):
    """Every indexer keeps all keys (index_topk ≥ the prompt): the logits comparisons below measure the merge, not
    which near-tied key a re-quantized indexer picks (the sparse path itself: tests/model/test_fp8_v32.py)."""
    for m in model.modules():
        if hasattr(m, "index_topk"):
            m.index_topk = 1 << 20
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return _dense(model).eval()(input_ids=torch.tensor([IDS]), use_cache=False).logits[0].float()


def test_v32_fp8_lora_trains_and_exports_fp8_and_bf16(tmp_path):
    from dsft.model.shipped import write_shipped

    base = write_shipped(tmp_path / "v3.2", shape="v3.2")
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(base)}, "data": {"max_seq_length": 96},
           "train": {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_steps": 1000, "report_to": ["none"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    _dsft("data", "prepare", str(tmp_path / "cfg.yaml"))
    r = _dsft("train", str(tmp_path / "cfg.yaml"))
    assert "FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept" in r.stdout + r.stderr
    adapter = tmp_path / "run" / "train" / "adapter"
    _dsft("export", str(tmp_path / "cfg.yaml"), "--dtype", "fp8")
    merged8 = tmp_path / "run" / "export" / "merged"
    _dsft("export", "--model", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "out16"), "--dtype", "bfloat16")
    merged16 = tmp_path / "out16" / "merged"

    src, out8 = read_all(base), read_all(merged8)
    kept = [k for k in src if k.startswith("model.layers.3.") or ".indexer." in k]  # MTP + the (untrained) indexer
    assert any(".indexer.wk.weight_scale_inv" in k for k in kept)
    for k in kept:
        assert torch.equal(out8[k].reshape(-1).view(torch.uint8), src[k].reshape(-1).view(torch.uint8)), k
    assert json.loads((merged8 / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"

    from dsft.model.adapters import load_adapter
    from dsft.model.load import load_model

    want = _logits(load_adapter(load_model(base, dtype="float32"), adapter))  # base + adapter, unmerged
    got8, before = _logits(load_model(merged8, dtype="float32")), _logits(load_model(base, dtype="float32"))
    # FP8 e4m3 keeps 3 mantissa bits: every merged tensor is re-quantized (per-element max ≈ 3.7 %, mean ≈ 0.4 %,
    # the manifest's requant_error), and that compounds over the layers; the merge still carries the adapter
    _close(got8, want, 0.1)
    assert (got8 - want).abs().max() < 0.15 * (before - want).abs().max()
    cfg16 = json.loads((merged16 / "config.json").read_text())
    (merged16 / "config.json").write_text(json.dumps({**cfg16, "index_topk": 1 << 20}))  # dense, as above
    res16 = _plain(PLAIN.replace("d = sys.argv[1]", f"d = {str(merged16)!r}"), tmp_path)
    assert res16["cls"] == "DeepseekV32ForCausalLM" and not res16["dsft"] and res16["gen"] == len(IDS) + 3
    _close(res16["logits"], want, 0.03)
    assert fp8.FP8_DTYPE not in {t.dtype for t in read_all(merged16).values()}
