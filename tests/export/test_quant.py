"""CPU int8 / int4 and fp16 / bf16 variants (incl. fused MoE experts), reload, refusals, fp16 overflow check (bnb: test_bnb.py;
the quantization report that measures them: tests/eval/test_quant_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_helpers import make_run

from dsft.config import config_from_dict
from dsft.errors import ExportError, ModelError
from dsft.export.quant import quantize_and_save, quantize_model, split_experts
from dsft.export.stage import run as export
from dsft.model.quantized import load_quantized, pack_int4, unpack_int4

TEXT = "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办？<｜Assistant｜>多休息，多喝水。<｜end▁of▁sentence｜>"


def _fp32(base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(base))


def _logits(model, tok, text=TEXT):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def test_split_experts_is_exact(tiny_base):
    model, tok = _fp32(tiny_base)
    want = _logits(model, tok)
    names = split_experts(model)
    assert len(names) == 3  # layers 1-3 are MoE in the tiny model
    assert not any(p.ndim == 3 for p in model.parameters())
    assert (want - _logits(model, tok)).abs().max() < 1e-5


@pytest.mark.parametrize("scheme,size_max,err_max", [("int8", 0.30, 0.15), ("int4", 0.22, 0.6)])
def test_cpu_variant_quantizes_everything_and_reloads(tmp_path, tiny_base, scheme, size_max, err_max):
    import torch.ao.nn.quantized.dynamic as nnqd

    model, tok = _fp32(tiny_base)
    ref = _logits(model, tok)
    info = quantize_and_save(tiny_base, tmp_path / scheme, scheme)
    # every Linear incl. 4 experts x 2 per MoE layer and lm_head; only norms/router stay float
    n_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert info["quantized_linear"] == n_linear + 3 * 4 * 2 and info["experts_split"] == 3
    meta = json.loads((tmp_path / scheme / "dsft_quant.json").read_text())
    assert all(k.endswith(("norm", ".mlp.gate")) for k in meta["kept_float"]), meta["kept_float"]  # norms + routers only
    assert "model.embed_tokens" in meta["embedding"] and "lm_head" in meta["linear"]
    ratio = _weights_bytes(tmp_path / scheme) / _weights_bytes(tiny_base)
    assert ratio < size_max, ratio
    q, qtok = load_quantized(tmp_path / scheme)
    assert sum(isinstance(m, nnqd.Linear) for m in q.modules()) == info["quantized_linear"]
    got = _logits(q, qtok)
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert 0 < err < err_max, err
    # serialization is lossless: the reloaded model equals the in-memory quantized one
    mem = _fp32(tiny_base)[0]
    quantize_model(mem, scheme)
    assert (got - _logits(mem, tok)).abs().max() < 1e-5
    ids = qtok("头痛", return_tensors="pt")["input_ids"]
    assert q.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_int4_packing_roundtrip():
    w = torch.randn(6, 70)
    packed, scales = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 48) and scales.shape == (6, 3)
    back = unpack_int4(packed, scales, 70)
    # error ≤ half a step of each group's scale
    step = scales.float().repeat_interleave(32, dim=1)[:, :70]
    assert ((back - w).abs() <= step / 2 + 1e-3).all()
    q2 = unpack_int4(*pack_int4(back), 70)
    assert (q2 - back).abs().max() < 1e-3


def test_load_quantized_refuses_plain_folder(tiny_base):
    with pytest.raises(ModelError, match="dsft_quant.json"):
        load_quantized(tiny_base)


def test_gguf_refused_without_the_extra(tmp_path, tiny_base):
    from dsft.export.gguf import gguf_unavailable_reason

    if gguf_unavailable_reason() is None:
        pytest.skip("the gguf extra is installed here (tests/export/test_gguf.py covers it)")
    run = make_run(tmp_path / "run", tiny_base, None, model_dir=tiny_base)
    cfg = config_from_dict({"run_dir": str(run.root), "export": {"formats": ["gguf-q4_k_m"]}})
    with pytest.raises(ExportError, match=r"pip install 'dsft\[gguf\]'"):
        export(cfg, run)


def test_unknown_format_rejected_when_the_config_loads():
    from dsft.errors import ConfigError

    with pytest.raises(ConfigError, match="export.formats.1: .*'gguf-q4_k_m'.*got 'awq'"):
        config_from_dict({"export": {"formats": ["merged", "awq"]}})


def test_fp16_overflow_is_caught_on_the_eval_set(tmp_path, tiny_base):
    from safetensors.torch import load_file, save_file

    hot = tmp_path / "hot"
    import shutil

    shutil.copytree(tiny_base, hot)
    f = hot / "model.safetensors"
    t = load_file(str(f))
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] * 1e6  # activations far beyond fp16's 65504
    save_file(t, str(f), metadata={"format": "pt"})
    run = make_run(tmp_path / "run", hot, None, model_dir=hot)
    with pytest.raises(ExportError, match="exceeds the fp16 maximum.*bfloat16"):
        export(config_from_dict({"run_dir": str(run.root), "export": {"dtype": "float16"}}), run)
    m = export(config_from_dict({"run_dir": str(run.root), "export": {"dtype": "bfloat16"}}), run, force=True)
    assert m["dtype"] == "bfloat16"
    with pytest.raises(ExportError, match="exceeds the fp16 maximum.*the bf16 format"):  # the fp16 variant too
        export(config_from_dict({"run_dir": str(run.root), "export": {"formats": ["merged", "fp16"]}}), run, force=True)


def test_half_variants_are_16_bit_copies_of_merged(tmp_path, tiny_base, tiny_adapter):
    from dsft.model.artefacts import artefact_kind, load_torch_artefact

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    m = export(config_from_dict({"run_dir": str(run.root), "export": {"formats": ["merged", "fp16", "bf16", "int8"]}}), run)
    rows = {v["name"]: v for v in m["variants"]}
    assert [v["name"] for v in m["variants"]] == ["merged", "fp16", "bf16", "int8"]
    assert rows["int8"]["load"] == "dsft.model.quantized.load_quantized('int8')"
    d = run.root / "export"
    merged = load_torch_artefact(d / "merged", dtype="float32")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert rows[name]["format"] == "safetensors" and rows[name]["dtype"] == str(dtype).removeprefix("torch.")
        assert rows[name]["size_bytes"] == pytest.approx(rows["merged"]["size_bytes"] / 2, rel=0.02)
        assert artefact_kind(d / name) == "safetensors"
        half = load_torch_artefact(d / name, dtype=rows[name]["dtype"])
        assert next(half.parameters()).dtype == dtype
        for (k, a), b in zip(merged.state_dict().items(), half.state_dict().values(), strict=True):
            assert torch.equal(a.to(dtype), b), k  # exactly the merged weights, rounded once
    assert "fp16_max_activation" in rows["fp16"] and "fp16_max_activation" not in rows["bf16"]
    assert artefact_kind(d / "int8") == "dsft-quant"
