"""The eval stage end to end on a real tiny DeepSeek-V3 + real PEFT adapter + real medical records."""

from __future__ import annotations

import json
import re

import pytest
from eval_helpers import make_run, real_records

from dsft.config import config_from_dict
from dsft.errors import OverwriteError
from dsft.eval.stage import evaluate
from dsft.run import read_jsonl


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    records = real_records(12, per_label=2)
    for i, r in enumerate(records):
        r["difficulty"] = "easy" if i % 2 else "hard"
    train = real_records(30, start=400) + [dict(records[0], id="train:leaked")]  # one test item leaked into train
    run = make_run(tmp_path_factory.mktemp("run"), tiny_model_dir, tiny_adapter_dir, records, train_records=train)
    cfg = config_from_dict({"run_dir": str(run.root), "eval": {"max_samples": 10, "max_new_tokens": 12, "batch_size": 4}})
    manifest = evaluate(cfg, run)
    return cfg, run, manifest


def test_manifest_has_contract_keys(finished_run):
    _, run, m = finished_run
    for side in ("before", "after"):
        for k in ("loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1"):
            assert isinstance(m[side][k], float), (side, k)
    assert re.fullmatch(r"accuracy \d+ % → \d+ %", m["headline"])
    assert json.loads((run.root / "eval" / "manifest.json").read_text())["stage"] == "eval"
    assert (run.root / "eval" / m["eval_json"]).exists()
    png = (run.root / "eval" / m["loss_png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_changes_the_numbers(finished_run):
    _, _, m = finished_run
    assert m["before"]["loss"] != pytest.approx(m["after"]["loss"], abs=1e-6)
    assert m["before"]["perplexity"] == pytest.approx(__import__("math").exp(m["before"]["loss"]))


def test_predictions_file_agrees_with_metrics(finished_run):
    _, run, m = finished_run
    rows = read_jsonl(run.root / "eval" / "predictions.jsonl")
    for model, side in (("base", "before"), ("finetuned", "after")):
        gen = [r for r in rows if r["model"] == model and r["task"] == "generation"]
        cls = [r for r in rows if r["model"] == model and r["task"] == "classification"]
        assert len(gen) == len(cls) == m["n"] == 10
        acc = sum(r["label"] == r["prediction"] for r in cls) / len(cls)
        assert acc == pytest.approx(m[side]["accuracy"], abs=1e-9)
        free = [r for r in rows if r["model"] == model and r["task"] == "label_generation"]
        assert len(free) == m["n"] and all(r["prediction"] == "" or r["prediction"] in r["text"] for r in free)
        assert sum(r["label"] == r["prediction"] for r in free) / len(free) == pytest.approx(m[side]["gen_accuracy"])
        for r in cls:
            assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4)
            assert r["prediction"] == max(r["scores"], key=r["scores"].get)
        from dsft.eval.metrics import rouge_l

        assert rouge_l([r["prediction"] for r in gen], [r["reference"] for r in gen], "zh") == pytest.approx(m[side]["rouge_l"], abs=1e-9)


def test_refuses_to_overwrite_without_force(finished_run):
    cfg, run, _ = finished_run
    with pytest.raises(OverwriteError, match="--force"):
        evaluate(cfg, run)


def test_breakdowns_and_contamination(finished_run):
    _, run, m = finished_run
    ev = json.loads((run.root / "eval" / "eval.json").read_text())
    bd = ev["models"]["finetuned"]["breakdown"]
    assert set(bd) == {"domain", "difficulty"} and set(bd["difficulty"]) == {"easy", "hard"}
    assert sum(v["n"] for v in bd["difficulty"].values()) == m["n"]
    assert sum(v["n"] for v in bd["domain"].values()) == m["n"]
    assert m["contamination"]["flagged"] == 1
    assert ev["contamination"]["pairs"][0]["train_id"] == "train:leaked"
    md = (run.root / "eval" / "report.md").read_text()
    assert "train:leaked" in md and "| metric | base | finetuned |" in md and m["headline"] in md


def test_score_cli_on_the_runs_predictions(finished_run, capsys):
    from dsft.cli import main

    _, run, m = finished_run
    assert main(["eval", "score", str(run.root / "eval" / "predictions.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for model, side in (("base", "before"), ("finetuned", "after")):
        for k in ("rouge_l", "bleu", "accuracy", "macro_f1", "auc"):  # full-precision scores → the same AUC
            assert res[model][k] == pytest.approx(m[side][k], abs=1e-9), (model, k)
        assert res[f"{model}:free_text"]["accuracy"] == pytest.approx(m[side]["gen_accuracy"], abs=1e-9)


def test_report_html_is_self_contained_and_renders(finished_run, tmp_path):
    import shutil
    import subprocess

    _, run, m = finished_run
    html = (run.root / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(m["pngs"]) >= 3
    assert not re.search(r"(src|href)=[\"'](?!data:)", html)  # nothing external to fetch
    assert "id='metrics'" in html and "id='samples'" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("no chromium on PATH: cannot screenshot report.html headless")
    shot = tmp_path / "shot.png"
    # the HTML travels alone (no sibling PNGs) to prove it is self-contained
    lone = tmp_path / "report.html"
    lone.write_text(html, encoding="utf-8")
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1100,1800", lone.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-500:]
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(shot))[..., :3]
    assert img.shape[0] == 1800 and img.shape[1] == 1100
    nonwhite = (img.sum(-1) < 2.9).mean()
    blue = ((img[..., 2] - img[..., 0]) > 0.25).mean()  # the confusion matrices' blues and the loss line
    assert nonwhite > 0.05 and blue > 0.002, (nonwhite, blue)
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def test_export_variants_added_with_latency_headline(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    import shutil

    import yaml

    from dsft.cli import main

    run = make_run(tmp_path / "run", tiny_model_dir, tiny_adapter_dir, real_records(4, per_label=1))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run.root), "eval": {"max_samples": 4, "max_new_tokens": 4}}))
    assert main(["eval", str(cfg)]) == 0
    first = json.loads((run.root / "eval" / "manifest.json").read_text())
    assert "latency" not in first["headline"]
    exp = run.stage_dir("export")
    shutil.copytree(tiny_model_dir, exp / "merged")
    shutil.copytree(tiny_model_dir, exp / "small")
    run.write_manifest("export", {"merged": "merged", "variants": [
        {"name": "merged", "format": "safetensors", "path": "merged"},
        {"name": "small", "format": "safetensors", "path": "small"},
        {"name": "gguf-q4_k_m", "format": "gguf", "path": "gguf/model-Q4_K_M.gguf"}]})
    capsys.readouterr()
    assert main(["eval", str(cfg), "--variants"]) == 0
    m = json.loads((run.root / "eval" / "manifest.json").read_text())
    assert m["models"] == ["base", "finetuned", "merged", "small"]  # GGUF skipped
    assert re.fullmatch(r"accuracy \d+ % → \d+ %, latency [−+]\d+ %", m["headline"]), m["headline"]
    assert m["quantized"]["name"] == "small"
    ev = json.loads((run.root / "eval" / "eval.json").read_text())
    # the same weights score the same numbers; base/fine-tuned are kept, not recomputed
    assert ev["models"]["small"]["loss"] == pytest.approx(ev["models"]["merged"]["loss"], abs=1e-6)
    assert ev["models"]["base"]["loss"] == pytest.approx(first["before"]["loss"], abs=1e-12)
    rows = read_jsonl(run.root / "eval" / "predictions.jsonl")
    assert {r["model"] for r in rows} == {"base", "finetuned", "merged", "small"}
    assert "<th>small</th>" in (run.root / "eval" / "report.html").read_text()


def test_merged_in_memory_equals_unmerged_adapter(finished_run, tmp_path, tiny_model_dir, tiny_adapter_dir):
    cfg, run, m = finished_run
    ev = json.loads((run.root / "eval" / "eval.json").read_text())
    assert ev["finetuned_adapter_merged"] is True
    records = read_jsonl(run.root / "data" / "test.jsonl")
    run2 = make_run(tmp_path / "run2", tiny_model_dir, tiny_adapter_dir, records)
    cfg2 = cfg.model_copy(update={"run_dir": str(run2.root), "eval": cfg.eval.model_copy(update={"merge_adapter": False,
                                                                                                  "compare_base": False})})
    m2 = evaluate(cfg2, run2)
    assert json.loads((run2.root / "eval" / "eval.json").read_text())["finetuned_adapter_merged"] is False
    assert m2["after"]["loss"] == pytest.approx(m["after"]["loss"], abs=1e-4)
    assert m2["after"]["auc"] == pytest.approx(m["after"]["auc"], abs=1e-6)
    assert m2["after"]["accuracy"] == m["after"]["accuracy"] and m2["after"]["rouge_l"] == pytest.approx(m["after"]["rouge_l"])


def test_label_in_text():
    from dsft.eval.scoring import label_in_text

    labels = ["内科", "普通内科", "消化科"]
    assert label_in_text("建议挂普通内科。", labels) == "普通内科"  # earliest, then longest
    assert label_in_text("消化科或者内科", labels) == "消化科"
    assert label_in_text("不知道", labels) is None
