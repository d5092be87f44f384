"""GGUF variants (optional extra): f16 / q8_0 / Q4_K_M of the tiny DeepSeek-V3 (deepseek2), verified with llama.cpp."""

from __future__ import annotations

import json

import pytest
from export_helpers import make_run

from dsft.config import config_from_dict
from dsft.export.gguf import gguf_unavailable_reason, modelfile
from dsft.export.stage import run as export
from dsft.run import read_jsonl

_WHY = gguf_unavailable_reason()
needs_gguf = pytest.mark.skipif(_WHY is not None, reason=f"GGUF extra absent: {_WHY}")


def test_modelfile_renders_deepseek_v3_template():
    from dsft.model.templates import get_template

    mf = modelfile("model-q4_k_m.gguf", get_template("deepseek-v3"))
    assert mf.startswith("FROM ./model-q4_k_m.gguf\n")
    assert "<｜User｜>{{ .Content }}" in mf and "<｜Assistant｜>" in mf
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"' in mf
    assert "### Instruction" in modelfile("x.gguf", get_template("deepseek-coder"))
    assert "User: {{ .Content }}" in modelfile("x.gguf", get_template("deepseek-llm"))


@needs_gguf
def test_gguf_variants_reload_and_match_the_source(tmp_path, tiny_base, tiny_adapter):
    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    cfg = config_from_dict({"run_dir": str(run.root), "export": {
        "formats": ["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"], "report": True,
        "report_samples": 2, "report_new_tokens": 4}})
    m = export(cfg, run)
    v = {x["name"]: x for x in m["variants"]}
    d = run.root / "export"
    for name in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        f = d / v[name]["path"]
        assert f.suffix == ".gguf" and f.read_bytes()[:4] == b"GGUF"
        assert v[name]["verify"]["tokenizer_matches"] is True
        assert v[name]["verify"]["greedy_match"] >= 0.5, v[name]["verify"]
    assert v["gguf-q4_k_m"]["size_bytes"] < v["gguf-q8_0"]["size_bytes"] < v["gguf-f16"]["size_bytes"]
    assert (d / "gguf" / "Modelfile").read_text().startswith("FROM ./model-q4_k_m.gguf")
    assert not (d / "gguf" / ".tmp-f16.gguf").exists()
    from dsft.eval.variants import measure_export

    measure_export(cfg, d, records=read_jsonl(run.root / "data" / "test.jsonl"), labels=["消化科", "神经科"])
    rows = {r["variant"]: r for r in json.loads((d / "quant_report.json").read_text())["rows"]}
    assert rows["gguf-f16"]["engine"].startswith("llama.cpp")
    # f16 GGUF ≈ the fp32 source: perplexity within 1 %, measured by llama.cpp on the same tokens
    assert abs(rows["gguf-f16"]["perplexity_delta_pct"]) < 1.0, rows["gguf-f16"]
    assert rows["gguf-f16"]["greedy_match"] >= 0.5, rows["gguf-f16"]  # the speed path decodes the same tokens
    assert rows["gguf-q4_k_m"]["decode_tok_s"] > 0 and rows["gguf-q4_k_m"]["prefill_tok_s"] > 0


@needs_gguf
def test_dense_llama_shape_converts_and_matches(tmp_path):
    """DeepSeek-LLM / Coder / R1-Distill-Llama are Llama-shaped: llama.cpp arch `llama`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dsft.export.gguf import make_gguf
    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    d = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    row = make_gguf(d, d / "gguf", "q8_0", tok=tok)
    assert row["verify"]["tokenizer_matches"] is True and row["verify"]["greedy_match"] >= 0.5
    with open(d / "gguf" / row["file"], "rb") as fh:
        head = fh.read(4096)
    assert head[:4] == b"GGUF" and b"llama" in head
