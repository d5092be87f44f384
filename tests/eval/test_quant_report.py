"""The quantization report, measured by the eval stage after a real export (merged, fp16, bf16, int8, int4)."""

from __future__ import annotations

import json

import pytest
from eval_helpers import make_run, real_records

from dsft.config import config_from_dict
from dsft.eval.stage import evaluate, run_variants
from dsft.export.stage import run as export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """A run with eval (base vs fine-tuned) and export (every CPU variant) done, nothing measured yet."""
    run = make_run(tmp_path_factory.mktemp("qrun"), tiny_model_dir, tiny_adapter_dir, real_records(4, per_label=1))
    cfg = config_from_dict({"run_dir": str(run.root), "eval": {"max_samples": 4, "max_new_tokens": 4, "variants": ["int8"]},
                            "export": {"formats": ["merged", "fp16", "bf16", "int8", "int4"], "report": True,
                                       "report_samples": 3, "report_new_tokens": 4, "report_threads": 1}})
    evaluate(cfg, run)
    export(cfg, run)
    return cfg, run


def test_export_only_writes_and_eval_measures_each_variant_once(exported, monkeypatch):
    import dsft.model.artefacts as artefacts

    cfg, run = exported
    assert not list((run.root / "export").glob("quant_report.*"))  # export writes the variants, nothing measured
    loads = []
    real = artefacts.load_torch_artefact
    monkeypatch.setattr(artefacts, "load_torch_artefact", lambda path, **kw: loads.append(path.name) or real(path, **kw))
    m = run_variants(cfg, run, every=False)
    assert sorted(loads) == ["bf16", "fp16", "int4", "int8", "merged"]  # one load each, int8 scored twice from it
    assert m["models"] == ["base", "finetuned", "int8"] and m["quantized"]["name"] == "int8"
    assert m["quant_report"]["json"] == "quant_report.json"
    ev = json.loads((run.root / "eval" / "eval.json").read_text())
    assert ev["quant_report"]["rows"] == m["quant_report"]["rows"] and "latency" in m["headline"]


def test_fp16_and_bf16_rows_are_measured_like_the_others(exported):
    cfg, run = exported
    d = run.root / "eval"
    if not (d / "quant_report.json").exists():
        run_variants(cfg, run, every=False)
    rep = json.loads((d / "quant_report.json").read_text())
    rows = {r["variant"]: r for r in rep["rows"]}
    assert list(rows) == ["merged", "fp16", "bf16", "int8", "int4"] and rep["reference"] == "merged"
    assert rep["samples"] == 3 and rep["threads"] == 1 and rep["classified"] == 3
    for name in ("fp16", "bf16"):
        r = rows[name]
        assert r["size_ratio"] == pytest.approx(0.5, abs=0.02)
        assert r["perplexity"] != rows["merged"]["perplexity"]  # measured in 16 bits, not copied
        assert abs(r["perplexity_delta_pct"]) < (0.5 if name == "fp16" else 5.0), r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["accuracy_delta"] is not None
        assert r["greedy_match"] > 0.3 and r["engine"] == "transformers"
    assert rows["int4"]["size_ratio"] < rows["int8"]["size_ratio"] < rows["fp16"]["size_ratio"]
    md = (d / "quant_report.md").read_text()
    assert "| fp16 | transformers |" in md and "| bf16 | transformers |" in md and "decode tok/s" in md
    assert (d / "quant_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_eval_variants_the_pipeline_step_scores_none(exported):
    import shutil

    cfg, run = exported
    shutil.rmtree(run.root / "eval")
    cfg2 = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"variants": None}),
                                  "export": cfg.export.model_copy(update={"report_samples": 1})})
    evaluate(cfg2, run)  # with an export present and eval.variants unset: every variant scored, the report too
    m = json.loads((run.root / "eval" / "manifest.json").read_text())
    assert m["models"] == ["base", "finetuned", "merged", "fp16", "bf16", "int8", "int4"] and m["quant_report"]["rows"]
    none = cfg2.model_copy(update={"eval": cfg2.eval.model_copy(update={"variants": []}),
                                   "export": cfg2.export.model_copy(update={"report": False})})
    evaluate(none, run, force=True)
    assert "quant_report" not in json.loads((run.root / "eval" / "manifest.json").read_text())
    m = run_variants(cfg2, run, every=False)  # what `dsft run` calls after export
    assert m["models"] == ["base", "finetuned"] and len(m["quant_report"]["rows"]) == 5
