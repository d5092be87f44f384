"""Score an existing predictions JSONL file (`dsft eval score`): text and classification metrics, per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.errors import DataError
from dsft.eval import metrics as M

ALL_METRICS = ("bleu", "rouge_1", "rouge_2", "rouge_l", "f1", "em", "accuracy", "macro_f1", "auc")
DEFAULT_METRICS = ("bleu", "rouge_l", "f1", "em", "accuracy", "macro_f1", "auc")


def parse_metrics(spec: str | None) -> list[str]:
    """'bleu,rouge_l' → ['bleu', 'rouge_l']; unknown names are a one-line DataError."""
    if not spec:
        return list(DEFAULT_METRICS)
    names = [s.strip().lower().replace("-", "_") for s in spec.split(",") if s.strip()]
    aliases = {"rougel": "rouge_l", "rouge": "rouge_l", "rouge1": "rouge_1", "rouge2": "rouge_2", "exact_match": "em", "acc": "accuracy"}
    names = [aliases.get(n, n) for n in names]
    bad = [n for n in names if n not in ALL_METRICS]
    if bad:
        raise DataError(f"--metrics: unknown metric {bad[0]!r} (known: {', '.join(ALL_METRICS)})")
    return names


def read_predictions(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line; one-line DataError naming file and line otherwise."""
    from dsft.records import read_json_lines

    return read_json_lines(path, "predictions file")


def _kind(obj: dict[str, Any]) -> str:
    task = obj.get("task")
    if task in ("generation", "classification"):
        return task
    if task == "label_generation":  # free-text label answers: classification rows of their own group
        return "classification"
    if "label" in obj:
        return "classification"
    if "reference" in obj:
        return "generation"
    return "?"


def score_rows(rows: list[tuple[int, dict[str, Any]]], metrics: list[str], lang: str = "auto",
               source: str = "<predictions>") -> dict[str, dict[str, Any]]:
    """{model: {metric: value, n_text, n_class}}; rows without a `model` key form the group 'all';
    free-text label answers (task label_generation) form the group '<model>:free_text'."""
    groups: dict[str, dict[str, list]] = {}
    for n, obj in rows:
        kind = _kind(obj)
        if kind == "?":
            raise DataError(f"{source}:{n}: expected keys prediction+reference (text) or label+prediction (classification)")
        if "prediction" not in obj:
            raise DataError(f"{source}:{n}: key 'prediction' missing")
        group = str(obj.get("model", "all")) + (":free_text" if obj.get("task") == "label_generation" else "")
        g = groups.setdefault(group, {"pred": [], "ref": [], "y": [], "yp": [], "scores": []})
        if kind == "generation":
            if "reference" not in obj:
                raise DataError(f"{source}:{n}: key 'reference' missing")
            g["pred"].append(str(obj["prediction"] or ""))
            ref = obj["reference"]
            g["ref"].append(ref if isinstance(ref, str) else [str(x) for x in ref])
        else:
            g["y"].append(str(obj["label"]))
            g["yp"].append(str(obj["prediction"]))
            sc = obj.get("scores")
            if sc is not None and not isinstance(sc, dict):
                raise DataError(f"{source}:{n}: 'scores' must be an object {{label: probability}}")
            g["scores"].append(sc)
    text_wanted = [m for m in metrics if m in M.TEXT_METRICS]
    cls_wanted = [m for m in metrics if m in M.CLASS_METRICS]
    out: dict[str, dict[str, Any]] = {}
    for name, g in groups.items():
        res: dict[str, Any] = {"n_text": len(g["pred"]), "n_class": len(g["y"])}
        if g["pred"] and text_wanted:
            flat_refs = [r if isinstance(r, str) else r[0] for r in g["ref"]]
            res.update(M.text_metrics(g["pred"], flat_refs, lang, metrics=[m for m in text_wanted if m not in ("f1", "em")]))
            if "f1" in text_wanted:
                res["f1"] = M.squad_f1(g["pred"], g["ref"], lang)
            if "em" in text_wanted:
                res["em"] = M.squad_em(g["pred"], g["ref"], lang)
            res["lang"] = lang if lang != "auto" else M.detect_lang(flat_refs)
        if g["y"] and cls_wanted:
            scores = g["scores"] if all(s for s in g["scores"]) else None
            res.update(M.class_metrics(g["y"], g["yp"], scores, metrics=cls_wanted))
        out[name] = res
    return out


def score_file(path: str | Path, metrics: str | list[str] | None = None, lang: str = "auto") -> dict[str, dict[str, Any]]:
    """Score a predictions file; see score_rows."""
    names = parse_metrics(metrics) if not isinstance(metrics, list) else metrics
    return score_rows(read_predictions(path), names, lang, source=str(path))


def format_table(scores: dict[str, dict[str, Any]], metrics: list[str]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    models = list(scores)
    head = ["metric", *models]
    body = []
    for m in [*metrics, "n_text", "n_class"]:
        vals = [scores[x].get(m) for x in models]
        if all(v is None for v in vals):
            continue
        body.append([m, *["—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in vals]])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in body]])
