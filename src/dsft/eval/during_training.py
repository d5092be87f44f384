"""Evaluation during training: eval loss + a generation metric on a small fixed subset, for early stopping.

The train stage builds one function before training and calls it every `eval_steps`:

    from dsft.eval.during_training import make_eval_fn, is_improvement
    eval_fn = make_eval_fn(cfg, eval_records, tokenizer)   # fixed subset, chosen once by seed
    res = eval_fn(model, step)   # numbers only: {"eval_loss", "eval_perplexity", "eval_rouge_l", ..., "eval_metric_value"}
    if is_improvement(res["eval_metric_value"], best, eval_fn.greater_is_better, cfg.train.early_stopping_delta): ...

`eval_fn.metric` names the chosen key (e.g. "eval_rouge_l"), `eval_fn.greater_is_better` its direction. Every
value in the result is a number, so it can go straight to TensorBoard/MLflow/W&B and log.jsonl. The model's
train/eval mode is restored after each call. Generation runs only when the chosen metric needs it or
`generate=True`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from dsft.eval import metrics as M
from dsft.records import prompt_and_reference

LOWER_IS_BETTER = {"eval_loss", "loss", "perplexity", "eval_perplexity"}
GENERATION_METRICS = {"rouge_1", "rouge_2", "rouge_l", "bleu", "f1", "em"}
KNOWN = LOWER_IS_BETTER | GENERATION_METRICS


def metric_key(name: str) -> str:
    """Canonical result key of a metric name: 'loss' → 'eval_loss', 'rouge_l' → 'eval_rouge_l'."""
    name = name.strip().lower()
    if name in ("loss", "eval_loss"):
        return "eval_loss"
    return name if name.startswith("eval_") else f"eval_{name}"


def greater_is_better(name: str) -> bool:
    return metric_key(name) not in {"eval_loss", "eval_perplexity"}


def is_improvement(value: float, best: float | None, greater: bool, delta: float = 0.0) -> bool:
    """True when value beats best by more than delta in the metric's direction (best None → True)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best + delta if greater else value < best - delta


def make_eval_fn(cfg, records: Sequence[dict[str, Any]], tokenizer, *, metric: str | None = None,
                 n: int | None = None, max_new_tokens: int | None = None, generate: bool = False,
                 lang: str | None = None) -> Callable[[Any], dict[str, Any]]:
    """Build eval_fn(model) → metrics on a fixed subset of `records` (seeded by cfg.data.seed).

    metric: cfg.eval.during_training_metric by default (eval_loss, perplexity, rouge_l, rouge_1, rouge_2, bleu, f1, em);
    n: cfg.eval.during_training_samples by default.
    """
    from dsft.errors import ConfigError
    from dsft.eval.stage import generation_settings, select_records

    metric = metric or cfg.eval.during_training_metric
    key = metric_key(metric)
    if key.removeprefix("eval_") not in {k.removeprefix("eval_") for k in KNOWN}:
        raise ConfigError(f"eval.during_training_metric: unknown metric {metric!r} (known: eval_loss, perplexity, "
                          f"{', '.join(sorted(GENERATION_METRICS))})")
    subset = select_records(list(records), n or cfg.eval.during_training_samples, cfg.data.seed)
    if not subset:
        raise ConfigError("during-training eval: no usable eval record (need original records with an assistant turn)")
    items = [prompt_and_reference(r) for r in subset]
    refs = [a for _, a in items]
    use_lang = lang or (cfg.eval.lang if cfg.eval.lang != "auto" else M.detect_lang(refs))
    settings = generation_settings(cfg)
    if max_new_tokens:
        settings.max_new_tokens = max_new_tokens
    want_generation = generate or key.removeprefix("eval_") in GENERATION_METRICS
    greater = greater_is_better(metric)

    def eval_fn(model, step: int | None = None) -> dict[str, float]:
        from dsft.eval import predict as P

        t0 = time.perf_counter()
        loss = P.answer_loss(model, tokenizer, items, batch_size=cfg.eval.batch_size, max_length=cfg.data.max_seq_length)
        res: dict[str, float] = {"eval_loss": loss["loss"], "eval_perplexity": loss["perplexity"], "eval_samples": len(items)}
        if want_generation:
            gen = P.generate(model, tokenizer, [m for m, _ in items], settings, max_prompt_length=cfg.data.max_seq_length)
            tm = M.text_metrics(gen["texts"], refs, use_lang, metrics=sorted(GENERATION_METRICS))
            res.update({f"eval_{k}": v for k, v in tm.items()})
            eval_fn.last_predictions = gen["texts"]  # type: ignore[attr-defined]
        res["eval_metric_value"] = res[key]
        res["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return res

    eval_fn.subset_ids = [r.get("id") for r in subset]  # type: ignore[attr-defined]
    eval_fn.last_predictions = []  # type: ignore[attr-defined]
    eval_fn.metric = key  # type: ignore[attr-defined]
    eval_fn.greater_is_better = greater  # type: ignore[attr-defined]
    return eval_fn
