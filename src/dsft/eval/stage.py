"""The eval stage: base vs fine-tuned (vs quantized) on the held-out split → eval.json, predictions, reports."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import DataError, ModelError
from dsft.eval import metrics as M
from dsft.records import label_prompt_messages, prompt_and_reference
from dsft.run import RunDir, atomic_write_json, read_jsonl, write_jsonl

log = logging.getLogger("dsft.eval")

HEADLINE_METRICS = ("loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1")


def load_adapter(base_model, adapter_dir: str | Path):
    """Wrap a loaded base model with a saved PEFT adapter (the train stage's format)."""
    try:  # the train stage's loader, when present, knows its own adapter layout
        from dsft.model.adapters import load_adapter as _train_load_adapter  # type: ignore[attr-defined]
    except ImportError:
        _train_load_adapter = None
    if _train_load_adapter is not None:
        return _train_load_adapter(base_model, adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)


def _to_device(model):
    """Move a model loaded on CPU to the GPU when one is present (no-op on CPU-only machines)."""
    import torch

    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None:
        return model.to("cuda")
    return model


def select_records(records: list[dict[str, Any]], max_samples: int | None, seed: int) -> list[dict[str, Any]]:
    """Original (not derived/augmented) records with an assistant turn; a seeded sample of at most max_samples, file order kept."""
    usable = [r for r in records if str(r.get("provenance") or "original") == "original"
              and any(m.get("role") == "assistant" for m in r.get("messages", []))]
    if max_samples and len(usable) > max_samples:
        keep = sorted(random.Random(seed).sample(range(len(usable)), max_samples))
        usable = [usable[i] for i in keep]
    return usable


def generation_settings(cfg: Config):
    from dsft.eval.predict import GenerationSettings

    e = cfg.eval
    return GenerationSettings(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature,
                              no_repeat_ngram_size=e.no_repeat_ngram_size, repetition_penalty=e.repetition_penalty,
                              batch_size=e.batch_size)


def evaluate_model(model, tok, records: list[dict[str, Any]], cfg: Config, *, labels: list[str] | None,
                   lang: str, name: str, gen_fn=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All metrics of one model on records → (metrics dict, prediction rows for predictions.jsonl).

    gen_fn(prompts) → generation result replaces the transformers generator (the vLLM backend).
    """
    from dsft.eval import predict as P

    e = cfg.eval
    t0 = time.perf_counter()
    items = [prompt_and_reference(r) for r in records]
    max_len = cfg.data.max_seq_length
    loss = P.answer_loss(model, tok, items, batch_size=e.batch_size, max_length=max_len)
    prompts = [m for m, _ in items]
    gen = gen_fn(prompts) if gen_fn else P.generate(model, tok, prompts, generation_settings(cfg), max_prompt_length=max_len)
    preds, refs = gen["texts"], [a for _, a in items]
    res: dict[str, Any] = {"loss": loss["loss"], "perplexity": loss["perplexity"], "answer_tokens": loss["tokens"]}
    res.update(M.text_metrics(preds, refs, lang, metrics=("rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em")))
    res["generation_s"] = round(gen["seconds"], 3)
    res["latency_ms_per_sample"] = round(1000 * gen["seconds"] / max(len(preds), 1), 2)
    res["new_tokens"] = gen["new_tokens"]
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
        classes, matrix = M.confusion(y, cls_pred, labels)
        res["confusion"] = {"classes": classes, "matrix": matrix}
        full_pred: list[str | None] = [None] * len(records)
        for i, p, pr in zip(keep, cls_pred, probs, strict=True):
            full_pred[i] = p
            rows.append({"model": name, "task": "classification", "id": records[i].get("id"),
                         "domain": records[i].get("domain"), "difficulty": records[i].get("difficulty"),
                         "label": gold[i], "prediction": p, "scores": {k: round(v, 6) for k, v in pr.items()}})
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


def headline(before: dict[str, Any], after: dict[str, Any], quantized: dict[str, Any] | None = None) -> str:
    """The seed's headline form: "accuracy X % → Y %" (+ ", latency −Z %" when a quantized model was compared)."""
    def pct(x):
        return f"{100 * x:.0f} %"

    if before.get("accuracy") is not None and after.get("accuracy") is not None:
        text = f"accuracy {pct(before['accuracy'])} → {pct(after['accuracy'])}"
    elif before.get("rouge_l") is not None and after.get("rouge_l") is not None:
        text = f"ROUGE-L {before['rouge_l']:.3f} → {after['rouge_l']:.3f}"
    else:
        text = "fine-tuned model evaluated (no base comparison)"
    if quantized and quantized.get("latency_ms_per_sample") and after.get("latency_ms_per_sample"):
        d = 100 * (quantized["latency_ms_per_sample"] / after["latency_ms_per_sample"] - 1)
        text += f", latency {'−' if d < 0 else '+'}{abs(d):.0f} %"
    return text


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em", "accuracy", "macro_f1", "auc",
            "latency_ms_per_sample")
    return {k: m.get(k) for k in keys if k in m}


def evaluate(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Run the eval stage of a run directory (needs the data and train stages); returns the eval manifest."""
    from dsft.eval.plots import confusion_png, loss_curve_png
    from dsft.eval.report import write_reports
    from dsft.eval.vllm_backend import generate_vllm, use_vllm
    from dsft.model.load import load_model, load_model_and_tokenizer

    data_m = run.read_manifest("data")
    train_m = run.read_manifest("train")
    data_dir, train_dir = run.root / "data", run.root / "train"
    test_path = data_dir / data_m["test"]
    if not test_path.exists():
        raise DataError(f"{test_path}: the data manifest's test split is missing")
    vllm = use_vllm(cfg.eval.backend)  # fails before any work when vllm is asked for but absent
    out = run.prepare_stage("eval", force=force)
    t_start = time.perf_counter()

    records = select_records(read_jsonl(test_path), cfg.eval.max_samples, cfg.data.seed)
    if not records:
        raise DataError(f"{test_path}: no original record with an assistant turn to evaluate")
    labels = [str(x) for x in (data_m.get("labels") or [])] or None
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
        return lambda prompts: generate_vllm(model_dir, tok, prompts, generation_settings(cfg), adapter_dir=adapter_dir,
                                             max_prompt_length=cfg.data.max_seq_length,
                                             trust_remote_code=cfg.model.trust_remote_code)

    model, tok, _ = load_model_and_tokenizer(cfg.model, model_dir=base_dir)
    model = _to_device(model)
    if cfg.eval.compare_base:
        models["base"], r = evaluate_model(model, tok, records, cfg, labels=labels, lang=lang, name="base",
                                           gen_fn=vllm_fn(base_dir))
        rows += r
    if train_m.get("adapter"):
        ft = load_adapter(model, train_dir / train_m["adapter"])
        ft_gen = vllm_fn(base_dir, train_dir / train_m["adapter"])
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

    quant_name, quant = _evaluate_variants(cfg, run, tok, records, labels, lang, models, rows)

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
    head = headline(before, after, quant)
    write_jsonl(out / "predictions.jsonl", rows)
    result = {
        "n": len(records), "lang": lang, "labels": labels, "label_field": data_m.get("label_field"),
        "test": str(test_path), "base_model": str(base_dir),
        "decoding": {**generation_settings(cfg).as_dict(), "backend": "vllm" if vllm else "transformers"},
        "label_scoring": cfg.eval.label_scoring,
        "metric_notes": {"bleu": "sacrebleu corpus BLEU / 100, tokenize=" + ("zh" if lang == "zh" else "13a"),
                         "rouge": "rouge-score F-measure, mean over items; " + ("character-level (CJK chars, ASCII words)" if lang == "zh" else "rouge-score tokenizer"),
                         "f1_em": "CMRC 2018 (character-level)" if lang == "zh" else "SQuAD v1.1",
                         "auc": "one-vs-rest, macro over classes present, from label log-likelihood softmax",
                         "loss": "token-weighted mean NLL of the reference answer turn (incl. end-of-turn)"},
        "models": models, "before": before, "after": after, "headline": head,
        "contamination": contamination,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if quant_name:
        result["quantized"] = {"name": quant_name, **_summary(quant)}
    atomic_write_json(out / "eval.json", result)
    reports = write_reports(out, result, rows, pngs, cfg)
    manifest = {
        "eval_json": "eval.json", "predictions": "predictions.jsonl", **reports,
        "loss_png": pngs.get("loss"), "pngs": pngs, "n": len(records), "lang": lang,
        "before": before, "after": after, "headline": head, "seconds": result["seconds"],
    }
    if quant_name:
        manifest["quantized"] = result["quantized"]
    if contamination is not None:
        manifest["contamination"] = {k: contamination[k] for k in ("n", "threshold", "checked", "flagged", "rate")}
    run.write_manifest("eval", manifest)
    return manifest


def _evaluate_variants(cfg, run, tok, records, labels, lang, models, rows):
    """Evaluate the first transformers-loadable quantized/exported variant when the export stage already ran."""
    if not run.has("export"):
        return None, None
    from dsft.model.load import load_model

    exp = run.read_manifest("export")
    for v in exp.get("variants") or []:
        if not isinstance(v, dict):
            continue
        rel = v.get("dir") or v.get("path")
        if not rel:
            continue
        vdir = Path(rel) if Path(rel).is_absolute() else run.root / "export" / rel
        if not (vdir / "config.json").exists() or not any(vdir.glob("*.safetensors")):
            continue
        name = str(v.get("name") or vdir.name)
        try:
            model = _to_device(load_model(vdir, dtype=cfg.model.dtype))
        except ModelError as err:
            log.warning("eval: skipping variant %s (%s)", name, err)
            continue
        models[name], r = evaluate_model(model, tok, records, cfg, labels=labels, lang=lang, name=name)
        rows += r
        return name, models[name]
    return None, None
