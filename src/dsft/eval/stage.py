"""The eval stage: base vs fine-tuned (vs exported variants) on the held-out split → eval.json, predictions, reports,
and — after the export stage — the quantization report of its variants (quant_report.*)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import ConfigError, DataError, DsftError, ModelError
from dsft.eval import metrics as M
from dsft.eval.scoring import (
    SUMMARY_KEYS,
    evaluate_model,
    generation_settings,
    headline,
    select_records,
    summary,
)
from dsft.records import prompt_and_reference
from dsft.run import RunDir, atomic_write_json, read_jsonl, write_jsonl

log = logging.getLogger("dsft.eval")


def run(cfg: Config, run_dir: RunDir, *, force: bool = False, variants: bool = False) -> dict[str, Any]:
    """The eval stage → its manifest. variants=True: after `dsft export`, measure the export's variants (the
    quantization report when export.report, eval.variants columns) and add them to this stage's outputs."""
    if variants:
        return run_variants(cfg, run_dir)
    return evaluate(cfg, run_dir, force=force)


def _to_device(model):
    """Move a model loaded on CPU to the GPU when one is present (no-op on CPU-only machines)."""
    import torch

    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None:
        return model.to("cuda")
    return model


def _merge_in_memory(peft_model):
    """Fold LoRA into the in-memory weights (same outputs up to float rounding, faster decoding) → (model, merged?)."""
    try:
        return peft_model.merge_and_unload(), True
    except Exception as err:  # peft raises several types for layers it cannot merge
        log.warning("eval: cannot merge the adapter in memory (%s: %s); evaluating it unmerged",
                    type(err).__name__, str(err).splitlines()[0][:160] if str(err) else "")
        return peft_model, False


def _inputs(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Checked inputs of the stage: manifests, the test split, the records to score, labels, language."""
    data_m, train_m = run.read_manifest("data"), run.read_manifest("train")
    test_path = run.root / "data" / data_m["test"]
    if not test_path.exists():
        raise DataError(f"{test_path}: the data manifest's test split is missing")
    unknown = [k for k in cfg.eval.metrics if k not in SUMMARY_KEYS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric {unknown[0]!r} (known: {', '.join(SUMMARY_KEYS)})")
    records = select_records(read_jsonl(test_path), cfg.eval.max_samples, cfg.data.seed)
    if not records:
        raise DataError(f"{test_path}: no original record with an assistant turn to evaluate")
    # the label set: the data manifest's, else every label seen in the test split
    labels = [str(x) for x in (data_m.get("labels") or [])] or \
        sorted({str(r["label"]) for r in read_jsonl(test_path) if r.get("label") is not None}) or None
    lang = cfg.eval.lang if cfg.eval.lang != "auto" else M.detect_lang([prompt_and_reference(r)[1] for r in records])
    return {"data_m": data_m, "train_m": train_m, "test_path": test_path, "records": records, "labels": labels,
            "lang": lang, "base_dir": Path(train_m["base_model"])}


def _contamination(cfg: Config, run: RunDir, inp: dict[str, Any]) -> dict[str, Any] | None:
    """The n-gram overlap of the test split with the training split (None without a training split)."""
    from dsft.eval.contamination import check

    train_rel = inp["data_m"].get("train")
    if not train_rel or not (run.root / "data" / train_rel).exists():
        return None
    c = check(select_records(read_jsonl(inp["test_path"]), None, cfg.data.seed), read_jsonl(run.root / "data" / train_rel),
              n=cfg.eval.contamination_ngram, threshold=cfg.eval.contamination_threshold, lang=inp["lang"])
    if c["flagged"]:
        log.warning("eval: %d of %d test items share ≥ %.0f%% of their %d-grams with a training item (see eval.json "
                    "'contamination'), e.g. %s ↔ %s", c["flagged"], c["checked"], 100 * c["threshold"], c["n"],
                    c["pairs"][0]["eval_id"], c["pairs"][0]["train_id"])
    return c


def _score_base_and_finetuned(cfg: Config, run: RunDir, inp: dict[str, Any], vllm: bool):
    """Scores of the base and the fine-tuned model → (models, prediction rows, tokenizer, adapter merged?)."""
    from dsft.eval.vllm_backend import generate_vllm
    from dsft.model.load import load_model, load_model_and_tokenizer

    train_m, train_dir, base_dir = inp["train_m"], run.root / "train", inp["base_dir"]
    kw = {"labels": inp["labels"], "lang": inp["lang"]}
    models: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []

    def vllm_fn(model_dir, adapter_dir=None):
        if not vllm:
            return None
        return lambda prompts, settings: generate_vllm(model_dir, tok, prompts, settings, adapter_dir=adapter_dir,
                                                       max_prompt_length=cfg.data.max_seq_length,
                                                       trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype)

    model, tok, _ = load_model_and_tokenizer(cfg.model, model_dir=base_dir)
    model = _to_device(model)
    if cfg.eval.compare_base:
        models["base"], r = evaluate_model(model, tok, inp["records"], cfg, name="base", gen_fn=vllm_fn(base_dir), **kw)
        rows += r
    merged = False
    if train_m.get("adapter"):
        from dsft.model.adapters import load_adapter

        ft = load_adapter(model, train_dir / train_m["adapter"])
        ft_gen = vllm_fn(base_dir, train_dir / train_m["adapter"])
        if cfg.eval.merge_adapter:
            ft, merged = _merge_in_memory(ft)
    elif train_m.get("model"):
        del model
        ft = _to_device(load_model(train_dir / train_m["model"], dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                   attn_implementation=cfg.model.attn_implementation))
        ft_gen = vllm_fn(train_dir / train_m["model"])
    else:
        raise ModelError(f"{run.manifest_path('train')}: neither 'adapter' nor 'model' is set — nothing fine-tuned to evaluate")
    models["finetuned"], r = evaluate_model(ft, tok, inp["records"], cfg, name="finetuned", gen_fn=ft_gen, **kw)
    return models, rows + r, tok, merged


def evaluate(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Run the eval stage of a run directory (needs the data and train stages); returns the eval manifest."""
    from dsft.eval.vllm_backend import use_vllm

    inp = _inputs(cfg, run)
    vllm = use_vllm(cfg.eval.backend)  # fails before any work when vllm is asked for but absent
    out = run.prepare_stage("eval", force=force)
    t_start = time.perf_counter()
    log.info("eval: %d held-out records, lang=%s, labels=%s", len(inp["records"]), inp["lang"], len(inp["labels"] or []))
    contamination = _contamination(cfg, run, inp)
    models, rows, tok, merged = _score_base_and_finetuned(cfg, run, inp, vllm)
    result = {
        "n": len(inp["records"]), "lang": inp["lang"], "labels": inp["labels"], "label_field": inp["data_m"].get("label_field"),
        "test": str(inp["test_path"]), "base_model": str(inp["base_dir"]), "record_ids": [r.get("id") for r in inp["records"]],
        "decoding": {**generation_settings(cfg).as_dict(), "backend": "vllm" if vllm else "transformers"},
        "label_scoring": cfg.eval.label_scoring, "finetuned_adapter_merged": merged,
        "metric_notes": _metric_notes(inp["lang"]), "models": models, "contamination": contamination,
    }
    if run.has("export"):
        _add_variants(cfg, run, out, tok, inp["records"], result, rows, every=True)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    return _write_outputs(cfg, run, out, result, rows, inp["train_m"])


def _metric_notes(lang: str) -> dict[str, str]:
    """How each metric in eval.json was computed (for this language)."""
    return {"bleu": "sacrebleu corpus BLEU / 100, tokenize=" + ("zh" if lang == "zh" else "13a"),
            "rouge": "rouge-score F-measure, mean over items; " + ("character-level (CJK chars, ASCII words)" if lang == "zh" else "rouge-score tokenizer"),
            "f1_em": "CMRC 2018 (character-level)" if lang == "zh" else "SQuAD v1.1",
            "auc": "one-vs-rest, macro over classes present, from label log-likelihood softmax",
            "loss": "token-weighted mean NLL of the reference answer turn (incl. end-of-turn)"}


def _add_variants(cfg: Config, run: RunDir, out: Path, tok, records: list[dict[str, Any]], result: dict[str, Any],
                  rows: list[dict[str, Any]], *, every: bool) -> list[str]:
    """Measure the export's variants once each: the quantization report (export.report) and the eval columns of
    eval.variants (unset: every variant PyTorch loads when `every`, else none) → names scored."""
    from dsft.eval.variants import held_out_records, measure_variants, quant_report_for
    from dsft.model.artefacts import artefact_kind

    exp = run.read_manifest("export")
    export_dir = run.root / "export"
    report = None
    if cfg.export.report:
        recs, labels = held_out_records(run, max(8, cfg.export.report_samples))
        report = quant_report_for(cfg, export_dir, exp.get("merged") or "merged", recs, labels)
    models = result["models"]
    selected = cfg.eval.variants

    def wanted(name: str) -> bool:
        return name not in models and (name in selected if selected is not None else every)

    def score(name: str, model, path: Path) -> None:
        model = _to_device(model) if artefact_kind(path) == "safetensors" else model
        models[name], r = evaluate_model(model, tok, records, cfg, labels=result.get("labels"), lang=result["lang"], name=name)
        rows.extend(r)

    done = measure_variants(cfg, export_dir, exp.get("variants") or [], report=report, score=score, wanted=wanted)
    if report is not None:
        result["quant_report"] = report.write(out, exp.get("dtype") or cfg.export.dtype)
    return done


def run_variants(cfg: Config, run: RunDir, *, every: bool = True) -> dict[str, Any]:
    """After `dsft export`: measure its variants (the quantization report when export.report; eval columns for
    eval.variants, or — when that is unset — for every variant if `every` (`dsft eval --variants`) or none (the
    pipeline)) on the eval stage's records, and add them to eval.json, the reports and the manifest."""
    from dsft.model.tokenizer import load_tokenizer

    if not run.has("eval"):
        raise DsftError(f"{run.manifest_path('eval')} not found: run `dsft eval` first")
    if not run.has("export"):
        raise DsftError(f"{run.manifest_path('export')} not found: run `dsft export` first")
    out = run.root / "eval"
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rows = read_jsonl(out / "predictions.jsonl")
    data_m, train_m = run.read_manifest("data"), run.read_manifest("train")
    by_id = {r.get("id"): r for r in read_jsonl(run.root / "data" / data_m["test"])}
    ids = result.get("record_ids") or []
    records = [by_id[i] for i in ids if i in by_id]
    if len(records) != len(ids) or not records:
        raise DataError(f"{out / 'eval.json'}: its records are no longer in the test split; rerun `dsft eval --force`")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model.tokenizer or train_m["base_model"], trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    added = _add_variants(cfg, run, out, tok, records, result, rows, every=every)
    if not added and not cfg.export.report:
        log.warning("eval: no export variant could be scored (GGUF-only, or already evaluated)")
    result["seconds"] = round((result.get("seconds") or 0) + time.perf_counter() - t0, 2)
    return _write_outputs(cfg, run, out, result, rows, train_m)


def _write_outputs(cfg: Config, run: RunDir, out: Path, result: dict[str, Any], rows: list[dict[str, Any]],
                   train_m: dict[str, Any]) -> dict[str, Any]:
    """PNGs, headline, eval.json, predictions.jsonl, reports and the manifest from the evaluated models."""
    from dsft.eval.plots import confusion_png, loss_curve_png
    from dsft.eval.report import write_reports

    models = result["models"]
    train_dir = run.root / "train"
    pngs: dict[str, str] = {}
    log_rel = train_m.get("log")
    if log_rel and (train_dir / log_rel).exists():
        p = loss_curve_png(read_jsonl(train_dir / log_rel), out / "loss.png", title="training loss")
        if p:
            pngs["loss"] = p.name
    for name, m in models.items():
        if m.get("confusion"):
            c = m["confusion"]
            pngs[f"confusion_{name}"] = confusion_png(c["classes"], c["matrix"], out / f"confusion_{name}.png",
                                                      title=f"{name}: true vs predicted").name
    before = summary(models.get("base", {}))
    after = summary(models["finetuned"])
    quant_name = next((n for n in models if n not in ("base", "finetuned", "merged")), None)
    reference = models.get("merged") or models["finetuned"]
    head = headline(before, after, models.get(quant_name) if quant_name else None, reference=reference)
    result.update(before=before, after=after, headline=head)
    if quant_name:
        result["quantized"] = {"name": quant_name, **summary(models[quant_name])}
    write_jsonl(out / "predictions.jsonl", rows)
    atomic_write_json(out / "eval.json", result)
    reports = write_reports(out, result, rows, pngs, cfg)
    manifest = {
        "eval_json": "eval.json", "predictions": "predictions.jsonl", **reports,
        "loss_png": pngs.get("loss"), "pngs": pngs, "n": result["n"], "lang": result["lang"],
        "before": before, "after": after, "headline": head, "seconds": result.get("seconds"),
        "models": list(models),
    }
    if quant_name:
        manifest["quantized"] = result["quantized"]
    if result.get("quant_report"):
        manifest["quant_report"] = result["quant_report"]
    if result.get("contamination") is not None:
        manifest["contamination"] = {k: result["contamination"][k] for k in ("n", "threshold", "checked", "flagged", "rate")}
    run.write_manifest("eval", manifest)
    return manifest


