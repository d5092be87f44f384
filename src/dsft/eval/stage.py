"""The eval stage: base vs fine-tuned (vs quantized) on the held-out split → eval.json, predictions, reports."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import ConfigError, DataError, DsftError, ModelError
from dsft.eval import metrics as M
from dsft.records import label_prompt_messages, prompt_and_reference
from dsft.run import RunDir, atomic_write_json, read_jsonl, write_jsonl

log = logging.getLogger("dsft.eval")

HEADLINE_METRICS = ("loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1")


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


def select_records(records: list[dict[str, Any]], max_samples: int | None, seed: int) -> list[dict[str, Any]]:
    """Original (not derived/augmented) records with an assistant turn; a seeded sample of at most max_samples, file order kept."""
    usable = [r for r in records if str(r.get("provenance") or "original") == "original"
              and any(m.get("role") == "assistant" for m in r.get("messages", []))]
    if max_samples and len(usable) > max_samples:
        keep = sorted(random.Random(seed).sample(range(len(usable)), max_samples))
        usable = [usable[i] for i in keep]
    return usable


def label_in_text(text: str, labels: list[str]) -> str | None:
    """The label a free-text answer names: the earliest (then longest) label occurring in it, else None."""
    hits = [(text.find(lab), -len(lab), lab) for lab in labels if lab and lab in text]
    return min(hits)[2] if hits else None


def generation_settings(cfg: Config, max_new_tokens: int | None = None):
    from dsft.eval.predict import GenerationSettings

    e = cfg.eval
    return GenerationSettings(max_new_tokens=max_new_tokens or e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature,
                              no_repeat_ngram_size=e.no_repeat_ngram_size, repetition_penalty=e.repetition_penalty,
                              batch_size=e.batch_size)


def evaluate_model(model, tok, records: list[dict[str, Any]], cfg: Config, *, labels: list[str] | None,
                   lang: str, name: str, gen_fn=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All metrics of one model on records → (metrics dict, prediction rows for predictions.jsonl).

    gen_fn(prompts, settings) → generation result replaces the transformers generator (the vLLM backend).
    """
    from dsft.eval import predict as P

    e = cfg.eval
    t0 = time.perf_counter()
    items = [prompt_and_reference(r) for r in records]
    max_len = cfg.data.max_seq_length
    loss = P.answer_loss(model, tok, items, batch_size=e.batch_size, max_length=max_len)
    prompts = [m for m, _ in items]
    settings = generation_settings(cfg)
    gen = gen_fn(prompts, settings) if gen_fn else P.generate(model, tok, prompts, settings, max_prompt_length=max_len)
    preds, refs = gen["texts"], [a for _, a in items]
    res: dict[str, Any] = {"loss": loss["loss"], "perplexity": loss["perplexity"], "answer_tokens": loss["tokens"]}
    res.update(M.text_metrics(preds, refs, lang, metrics=("rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em")))
    res["generation_s"] = round(gen["seconds"], 3)
    res["latency_ms_per_sample"] = round(1000 * gen["seconds"] / max(len(preds), 1), 2)
    res["new_tokens"] = gen["new_tokens"]
    res["ms_per_new_token"] = round(1000 * gen["seconds"] / gen["new_tokens"], 3) if gen["new_tokens"] else None
    rows: list[dict[str, Any]] = []
    for r, (msgs, ref), p, nll in zip(records, items, preds, loss["per_item"], strict=True):
        rows.append({"model": name, "task": "generation", "id": r.get("id"), "domain": r.get("domain"),
                     "difficulty": r.get("difficulty"), "prompt": msgs[-1]["content"] if msgs else "",
                     "prediction": p, "reference": ref, "loss": nll})
    cls_pred: list[str] = []
    gold = [str(r.get("label")) if r.get("label") is not None else None for r in records]
    if labels and cfg.data.label_prompt and any(g is not None for g in gold):
        keep = [i for i, g in enumerate(gold) if g is not None]
        prompts = [label_prompt_messages(records[i], cfg.data.label_prompt, cfg.data.system_prompt) for i in keep]
        scores = P.label_scores(model, tok, prompts, labels, batch_size=e.batch_size, max_length=max_len,
                                mean=e.label_scoring == "mean")
        probs = [M.softmax(s) for s in scores]
        cls_pred = [max(p, key=p.get) for p in probs]
        y = [gold[i] for i in keep]
        res.update(M.class_metrics(y, cls_pred, probs))
        res["classified"] = len(keep)
        if e.generative_classification:
            s_lab = generation_settings(cfg, max_new_tokens=e.label_max_new_tokens)
            gen_cls = gen_fn(prompts, s_lab) if gen_fn else P.generate(model, tok, prompts, s_lab, max_prompt_length=max_len)
            said = [label_in_text(t, labels) for t in gen_cls["texts"]]
            res["gen_accuracy"] = M.accuracy(y, [x or "" for x in said])
            for i, t, x in zip(keep, gen_cls["texts"], said, strict=True):
                rows.append({"model": name, "task": "label_generation", "id": records[i].get("id"), "label": gold[i],
                             "prediction": x or "", "text": t})
        classes, matrix = M.confusion(y, cls_pred, labels)
        res["confusion"] = {"classes": classes, "matrix": matrix}
        full_pred: list[str | None] = [None] * len(records)
        for i, p, pr in zip(keep, cls_pred, probs, strict=True):
            full_pred[i] = p
            rows.append({"model": name, "task": "classification", "id": records[i].get("id"),
                         "domain": records[i].get("domain"), "difficulty": records[i].get("difficulty"),
                         "label": gold[i], "prediction": p, "scores": dict(pr)})
    else:
        res.update({"accuracy": None, "macro_f1": None, "auc": None})
        full_pred = [None] * len(records)
    res["breakdown"] = breakdowns(records, preds, refs, gold, full_pred, cfg.eval.breakdown_fields, lang)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res, rows


def breakdowns(records, preds, refs, gold, cls_pred, fields, lang) -> dict[str, dict[str, dict[str, Any]]]:
    """{field: {value: {n, rouge_l, bleu, accuracy}}} for each field with at least two distinct values."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for f in fields:
        values = [r.get(f) if r.get(f) is not None else (r.get("fields") or {}).get(f) for r in records]
        groups = sorted({v for v in values if v is not None}, key=str)
        if len(groups) < 2:
            continue
        table: dict[str, dict[str, Any]] = {}
        for g in groups:
            idx = [i for i, v in enumerate(values) if v == g]
            row: dict[str, Any] = {"n": len(idx)}
            row.update(M.text_metrics([preds[i] for i in idx], [refs[i] for i in idx], lang, metrics=("rouge_l", "bleu")))
            scored = [i for i in idx if gold[i] is not None and cls_pred[i] is not None]
            row["accuracy"] = M.accuracy([gold[i] for i in scored], [cls_pred[i] for i in scored]) if scored else None
            table[str(g)] = row
        out[f] = table
    return out


def headline(before: dict[str, Any], after: dict[str, Any], quantized: dict[str, Any] | None = None,
             reference: dict[str, Any] | None = None) -> str:
    """The seed's headline form: "accuracy X % → Y %" (+ ", latency −Z %" of a quantized variant vs `reference`)."""
    def pct(x):
        return f"{100 * x:.0f} %"

    if before.get("accuracy") is not None and after.get("accuracy") is not None:
        text = f"accuracy {pct(before['accuracy'])} → {pct(after['accuracy'])}"
    elif before.get("rouge_l") is not None and after.get("rouge_l") is not None:
        text = f"ROUGE-L {before['rouge_l']:.3f} → {after['rouge_l']:.3f}"
    elif after.get("accuracy") is not None:
        text = f"accuracy {pct(after['accuracy'])} (fine-tuned; base not evaluated)"
    else:
        text = "fine-tuned model evaluated (no base comparison)"
    ref = reference or after
    if quantized and quantized.get("latency_ms_per_sample") and ref.get("latency_ms_per_sample"):
        d = 100 * (quantized["latency_ms_per_sample"] / ref["latency_ms_per_sample"] - 1)
        text += f", latency {'−' if d < 0 else '+'}{abs(d):.0f} %"
    return text


SUMMARY_KEYS = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em", "accuracy", "macro_f1", "auc",
                "gen_accuracy",
                "latency_ms_per_sample", "ms_per_new_token")


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in SUMMARY_KEYS if k in m}


def evaluate(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Run the eval stage of a run directory (needs the data and train stages); returns the eval manifest."""
    from dsft.eval.vllm_backend import generate_vllm, use_vllm
    from dsft.model.load import load_model, load_model_and_tokenizer

    data_m = run.read_manifest("data")
    train_m = run.read_manifest("train")
    data_dir, train_dir = run.root / "data", run.root / "train"
    test_path = data_dir / data_m["test"]
    if not test_path.exists():
        raise DataError(f"{test_path}: the data manifest's test split is missing")
    unknown = [k for k in cfg.eval.metrics if k not in SUMMARY_KEYS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric {unknown[0]!r} (known: {', '.join(SUMMARY_KEYS)})")
    vllm = use_vllm(cfg.eval.backend)  # fails before any work when vllm is asked for but absent
    out = run.prepare_stage("eval", force=force)
    t_start = time.perf_counter()

    records = select_records(read_jsonl(test_path), cfg.eval.max_samples, cfg.data.seed)
    if not records:
        raise DataError(f"{test_path}: no original record with an assistant turn to evaluate")
    # the label set: the data manifest's, else every label seen in the test split
    labels = [str(x) for x in (data_m.get("labels") or [])] or \
        sorted({str(r["label"]) for r in read_jsonl(test_path) if r.get("label") is not None}) or None
    lang = cfg.eval.lang if cfg.eval.lang != "auto" else M.detect_lang([prompt_and_reference(r)[1] for r in records])
    base_dir = Path(train_m["base_model"])
    log.info("eval: %d held-out records, lang=%s, labels=%s", len(records), lang, len(labels or []))

    contamination = None
    train_rel = data_m.get("train")
    if train_rel and (data_dir / train_rel).exists():
        from dsft.eval.contamination import check

        contamination = check(select_records(read_jsonl(test_path), None, cfg.data.seed), read_jsonl(data_dir / train_rel),
                              n=cfg.eval.contamination_ngram, threshold=cfg.eval.contamination_threshold, lang=lang)
        if contamination["flagged"]:
            log.warning("eval: %d of %d test items share ≥ %.0f%% of their %d-grams with a training item (see eval.json "
                        "'contamination'), e.g. %s ↔ %s", contamination["flagged"], contamination["checked"],
                        100 * contamination["threshold"], contamination["n"], contamination["pairs"][0]["eval_id"],
                        contamination["pairs"][0]["train_id"])

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
        models["base"], r = evaluate_model(model, tok, records, cfg, labels=labels, lang=lang, name="base",
                                           gen_fn=vllm_fn(base_dir))
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
    models["finetuned"], r = evaluate_model(ft, tok, records, cfg, labels=labels, lang=lang, name="finetuned", gen_fn=ft_gen)
    rows += r
    del ft

    result = {
        "n": len(records), "lang": lang, "labels": labels, "label_field": data_m.get("label_field"),
        "test": str(test_path), "base_model": str(base_dir), "record_ids": [r.get("id") for r in records],
        "decoding": {**generation_settings(cfg).as_dict(), "backend": "vllm" if vllm else "transformers"},
        "label_scoring": cfg.eval.label_scoring, "finetuned_adapter_merged": merged,
        "metric_notes": {"bleu": "sacrebleu corpus BLEU / 100, tokenize=" + ("zh" if lang == "zh" else "13a"),
                         "rouge": "rouge-score F-measure, mean over items; " + ("character-level (CJK chars, ASCII words)" if lang == "zh" else "rouge-score tokenizer"),
                         "f1_em": "CMRC 2018 (character-level)" if lang == "zh" else "SQuAD v1.1",
                         "auc": "one-vs-rest, macro over classes present, from label log-likelihood softmax",
                         "loss": "token-weighted mean NLL of the reference answer turn (incl. end-of-turn)"},
        "models": models, "contamination": contamination,
    }
    if run.has("export"):
        _evaluate_variants(cfg, run, tok, records, labels, lang, models, rows)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
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
    before = _summary(models.get("base", {}))
    after = _summary(models["finetuned"])
    quant_name = next((n for n in models if n not in ("base", "finetuned", "merged")), None)
    reference = models.get("merged") or models["finetuned"]
    head = headline(before, after, models.get(quant_name) if quant_name else None, reference=reference)
    result.update(before=before, after=after, headline=head)
    if quant_name:
        result["quantized"] = {"name": quant_name, **_summary(models[quant_name])}
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
    if result.get("contamination") is not None:
        manifest["contamination"] = {k: result["contamination"][k] for k in ("n", "threshold", "checked", "flagged", "rate")}
    run.write_manifest("eval", manifest)
    return manifest


def _load_variant(v: dict[str, Any], run: RunDir, cfg: Config):
    """A model for one export variant row, or None when this backend cannot score it (GGUF, missing folder)."""
    from dsft.model.load import load_model

    rel = v.get("path") or v.get("dir")
    if not rel or str(rel).endswith(".gguf") or str(v.get("format", "")).startswith("gguf"):
        return None
    vdir = Path(rel) if Path(rel).is_absolute() else run.root / "export" / rel
    if v.get("format") == "dsft-quant":
        try:
            from dsft.export import load_quantized
        except ImportError:
            return None
        return load_quantized(vdir)[0]
    if v.get("format") == "safetensors+bitsandbytes":  # on the GPU, or bitsandbytes' CPU backend without CUDA
        from dsft.model.bnb import load_quantized_dir

        return load_quantized_dir(vdir, trust_remote_code=cfg.model.trust_remote_code)
    if (vdir / "config.json").exists() and any(vdir.glob("*.safetensors")):
        return _to_device(load_model(vdir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code))
    return None


def _evaluate_variants(cfg, run, tok, records, labels, lang, models, rows) -> list[str]:
    """Evaluate the export stage's variants (eval.variants, default: every one this backend can load)."""
    exp = run.read_manifest("export")
    done = []
    for v in exp.get("variants") or []:
        if not isinstance(v, dict) or not v.get("name"):
            continue
        name = str(v["name"])
        if cfg.eval.variants is not None and name not in cfg.eval.variants:
            continue
        if name in models:
            continue
        try:
            model = _load_variant(v, run, cfg)
        except DsftError as err:
            log.warning("eval: skipping export variant %s (%s)", name, err)
            continue
        if model is None:
            log.info("eval: export variant %s cannot be scored by this backend; skipped", name)
            continue
        models[name], r = evaluate_model(model, tok, records, cfg, labels=labels, lang=lang, name=name)
        rows += r
        done.append(name)
        del model
    return done


def add_variants(cfg: Config, run: RunDir) -> dict[str, Any]:
    """After `dsft export`: score its variants on the same records and add them to eval.json and the reports."""
    from dsft.model.load import load_model_and_tokenizer

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
    _, tok, _ = load_model_and_tokenizer(cfg.model, model_dir=Path(train_m["base_model"]))
    added = _evaluate_variants(cfg, run, tok, records, result.get("labels"), result["lang"], result["models"], rows)
    if not added:
        log.warning("eval: no export variant could be scored (GGUF-only, or already evaluated)")
    result["seconds"] = round((result.get("seconds") or 0) + time.perf_counter() - t0, 2)
    return _write_outputs(cfg, run, out, result, rows, train_m)
