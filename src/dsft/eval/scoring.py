"""Scoring one model on held-out records: generation and classification metrics, breakdowns, the seed's headline."""

from __future__ import annotations

import random
import time
from typing import Any

from dsft.config import Config
from dsft.eval import metrics as M
from dsft.records import label_prompt_messages, prompt_and_reference
from dsft.report.numbers import fmt_pct

HEADLINE_METRICS = ("loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1")


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
    """The eval section's decoding settings (max_new_tokens overridden when given)."""
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
    rewards = verifiable_rewards(cfg, records, preds)
    if rewards is not None:
        res["reward"] = sum(rewards) / max(len(rewards), 1)
    res["generation_s"] = round(gen["seconds"], 3)
    res["latency_ms_per_sample"] = round(1000 * gen["seconds"] / max(len(preds), 1), 2)
    res["new_tokens"] = gen["new_tokens"]
    res["ms_per_new_token"] = round(1000 * gen["seconds"] / gen["new_tokens"], 3) if gen["new_tokens"] else None
    rows: list[dict[str, Any]] = []
    for r, (msgs, ref), p, nll in zip(records, items, preds, loss["per_item"], strict=True):
        rows.append({"model": name, "task": "generation", "id": r.get("id"), "domain": r.get("domain"),
                     "difficulty": r.get("difficulty"), "prompt": msgs[-1]["content"] if msgs else "",
                     "prediction": p, "reference": ref, "loss": nll})
        if rewards is not None:
            rows[-1]["reward"] = rewards[len(rows) - 1]
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


def verifiable_rewards(cfg: Config, records: list[dict[str, Any]], preds: list[str]) -> list[float] | None:
    """A GRPO run's task score of each answer (grpo.rewards through dsft.rewards, as in training), else None."""
    if cfg.train.objective != "grpo":
        return None
    from dsft.rewards import load_rewards, score

    fns = load_rewards(cfg.grpo.rewards)
    return [score(fns, p, r)[0] for p, r in zip(preds, records, strict=True)]


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
    if before.get("reward") is not None and after.get("reward") is not None:  # a GRPO run's verifiable task
        text = f"reward {before['reward']:.2f} → {after['reward']:.2f}"
    elif before.get("accuracy") is not None and after.get("accuracy") is not None:
        text = f"accuracy {fmt_pct(before['accuracy'], 0)} → {fmt_pct(after['accuracy'], 0)}"
    elif before.get("rouge_l") is not None and after.get("rouge_l") is not None:
        text = f"ROUGE-L {before['rouge_l']:.3f} → {after['rouge_l']:.3f}"
    elif after.get("accuracy") is not None:
        text = f"accuracy {fmt_pct(after['accuracy'], 0)} (fine-tuned; base not evaluated)"
    else:
        text = "fine-tuned model evaluated (no base comparison)"
    ref = reference or after
    if quantized and quantized.get("latency_ms_per_sample") and ref.get("latency_ms_per_sample"):
        d = 100 * (quantized["latency_ms_per_sample"] / ref["latency_ms_per_sample"] - 1)
        text += f", latency {'−' if d < 0 else '+'}{abs(d):.0f} %"
    return text


SUMMARY_KEYS = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em", "accuracy", "macro_f1", "auc",
                "gen_accuracy", "reward",
                "latency_ms_per_sample", "ms_per_new_token")


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The summary metrics (SUMMARY_KEYS) of one model's results."""
    return {k: m.get(k) for k in SUMMARY_KEYS if k in m}
