"""bitsandbytes variants (nf4, bnb-int8): exported, reloaded and generating on this machine; their report rows."""

from __future__ import annotations

import sys

import pytest
import torch
from export_helpers import make_run, read_json

from dsft.config import config_from_dict
from dsft.errors import ExportError
from dsft.export.stage import run as export
from dsft.run import read_jsonl

TEXT = "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办？<｜Assistant｜>多休息，多喝水。<｜end▁of▁sentence｜>"
SKIP = "bitsandbytes variants need bitsandbytes (pip install 'dsft[qlora]')"


def _logits(model, tok):
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0].float().cpu()


@pytest.mark.parametrize("fmt,layer,err_max", [("nf4", "Linear4bit", 0.6), ("bnb-int8", "Linear8bitLt", 0.1)])
def test_bnb_variant_exports_reloads_and_generates(tmp_path, tiny_base, tiny_adapter, fmt, layer, err_max):
    bnb = pytest.importorskip("bitsandbytes", reason=SKIP)
    from transformers import AutoTokenizer

    from dsft.model.bnb import load_quantized_dir
    from dsft.model.load import load_model

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    m = export(config_from_dict({"run_dir": str(run.root), "export": {"formats": ["merged", fmt]}}), run)
    rows = {v["name"]: v for v in m["variants"]}
    row = rows[fmt]
    assert row["format"] == "safetensors+bitsandbytes" and row["path"] == fmt
    assert row["engine"] == ("transformers+bitsandbytes (CUDA)" if torch.cuda.is_available()
                             else "transformers+bitsandbytes CPU backend")
    assert "fused 3-D MoE experts are not nn.Linear" in row["experts"]
    assert row["size_bytes"] < 0.6 * rows["merged"]["size_bytes"]  # fp32 merged → 4/8-bit linears + bf16 rest
    d = run.root / "export" / fmt
    assert read_json(d / "config.json")["quantization_config"]["quant_method"] == "bitsandbytes"

    tok = AutoTokenizer.from_pretrained(str(d))
    q = load_quantized_dir(d)
    assert sum(type(mod).__name__ == layer for mod in q.modules()) >= 20
    assert isinstance(next(mod for mod in q.modules() if type(mod).__name__ == layer), getattr(bnb.nn, layer))
    ref = _logits(load_model(run.root / "export" / "merged", dtype="float32").eval(), tok)
    got = _logits(q, tok)
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert 0 < err < err_max, err
    ids = tok("头痛", return_tensors="pt")["input_ids"].to(q.device)
    out = q.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_report_measures_bnb_variants(tmp_path, tiny_base, tiny_adapter):
    pytest.importorskip("bitsandbytes", reason=SKIP)
    from dsft.eval.variants import measure_export

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    cfg = config_from_dict({"run_dir": str(run.root), "export": {
        "formats": ["merged", "nf4", "bnb-int8"], "report": True, "report_samples": 2, "report_new_tokens": 4}})
    export(cfg, run)
    d = run.root / "export"
    measure_export(cfg, d, records=read_jsonl(run.root / "data" / "test.jsonl"), labels=["消化科", "神经科"])
    rows = {r["variant"]: r for r in read_json(d / "quant_report.json")["rows"]}
    assert set(rows) == {"merged", "nf4", "bnb-int8"}
    for name in ("nf4", "bnb-int8"):
        r = rows[name]
        assert "bitsandbytes" in r["engine"] and (torch.cuda.is_available() or "CPU backend" in r["engine"])
        assert r["size_ratio"] < 0.6 and r["perplexity"] > 1 and r["perplexity"] != rows["merged"]["perplexity"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and 0 <= r["rouge_l"] <= 1
        assert r["accuracy"] in (0.0, 0.5, 1.0) and r["hardware"]
    md = (d / "quant_report.md").read_text()
    assert "| nf4 |" in md and "| bnb-int8 |" in md


def test_model_loads_a_bnb_variant_by_its_files(tmp_path, tiny_base, tiny_adapter):
    pytest.importorskip("bitsandbytes", reason=SKIP)
    from dsft.model.artefacts import artefact_kind, load_torch_artefact

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    cfg = config_from_dict({"run_dir": str(run.root), "export": {"formats": ["merged", "nf4"]}})
    m = export(cfg, run)
    path = run.root / "export" / m["variants"][1]["path"]
    assert artefact_kind(path) == "bitsandbytes"
    model = load_torch_artefact(path)
    assert any(type(mod).__name__ == "Linear4bit" for mod in model.modules())


@pytest.mark.parametrize("fmt", ["nf4", "bnb-int8"])
def test_bnb_formats_without_bitsandbytes_refused_in_one_line(tmp_path, tiny_base, fmt, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError, as when absent
    run = make_run(tmp_path / "run", tiny_base, None, model_dir=tiny_base)
    cfg = config_from_dict({"run_dir": str(run.root), "export": {"formats": ["merged", fmt]}})
    with pytest.raises(ExportError, match=rf"'{fmt}' .*needs bitsandbytes: pip install 'bitsandbytes>=") as e:
        export(cfg, run)
    assert "\n" not in str(e.value)
    assert not (run.root / "export" / "merged").exists()  # refused before any work
