"""CLI of the eval stage: `dsft eval CONFIG` (base vs fine-tuned) and `dsft eval score PREDICTIONS.jsonl`."""

from __future__ import annotations

import argparse
import json

from dsft.cli_common import add_config_args, config_and_run

DESCRIPTION = """Evaluate on the held-out split of a run: base vs fine-tuned (and the exported variants when present):
loss, perplexity, ROUGE-1/2/L, BLEU, F1/EM, department accuracy, Macro-F1, AUC; with export.report the quantization
report of every export variant (size, perplexity, accuracy, ROUGE-L, prefill/decode speed).
Writes <run_dir>/eval/{eval.json, predictions.jsonl, report.md, report.html, *.png, quant_report.*, manifest.json}.

`dsft eval score FILE` scores an existing predictions JSONL instead: lines {"prediction", "reference"}
for text metrics and {"label", "prediction", "scores"?} for classification (grouped by "model" if present).
`dsft eval quant EXPORT_DIR` measures a `dsft export --model … -o EXPORT_DIR` folder (quant_report.* there)."""

EPILOG = """examples:
  dsft eval examples/demo.yaml
  dsft eval examples/demo.yaml --set eval.max_samples=32 --force
  dsft eval examples/demo.yaml --variants      # after dsft export: quant report + merged/int8 … columns + latency
  dsft eval quant out/ --eval-data held_out.jsonl --set export.report_samples=8
  dsft eval score runs/demo/eval/predictions.jsonl --metrics bleu,rouge_l,accuracy,macro_f1,auc --lang zh
  dsft eval score preds.jsonl --metrics f1,em --json
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate base vs fine-tuned; `dsft eval score FILE` scores predictions",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("predictions", nargs="?", metavar="PREDICTIONS.jsonl",
                   help="with `score`: the predictions file; with `quant`: the export folder")
    p.add_argument("--metrics", help="with `score`: comma list of bleu,rouge_1,rouge_2,rouge_l,f1,em,accuracy,macro_f1,auc")
    p.add_argument("--lang", choices=["auto", "zh", "en"], default="auto", help="with `score`: text language (default: detect)")
    p.add_argument("--variants", action="store_true",
                   help="after `dsft export`: measure its variants (quantization report with export.report; merged, int8 … "
                        "columns of eval.variants, default all) on the same records and add them to the reports")
    p.add_argument("--eval-data", metavar="JSONL", help="with `quant`: held-out records to measure on (default: built-in probes)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.config == "score":
        return _score(args)
    if args.config == "quant":
        return _quant(args)
    if args.predictions:
        from dsft.errors import ConfigError

        raise ConfigError(f"unexpected argument {args.predictions!r} (did you mean `dsft eval score {args.predictions}`?)")
    from dsft.eval.stage import run as run_eval

    cfg, run = config_and_run(args)
    m = run_eval(cfg, run, force=args.force, variants=args.variants)
    if args.json:
        print(json.dumps(m, ensure_ascii=False))
        return 0
    keys = list(dict.fromkeys([*cfg.eval.metrics, "latency_ms_per_sample"]))  # eval.metrics: the summary rows
    cols = [("base", m["before"]), ("fine-tuned", m["after"])]
    if m.get("quantized"):
        cols.append((m["quantized"]["name"], m["quantized"]))
    print(f"eval: {m['n']} held-out records → {run.root / 'eval'}")
    print(f"{'metric':<22}" + "".join(f"{name:>12}" for name, _ in cols))
    for k in keys:
        vals = [c.get(k) for _, c in cols]
        if all(v is None for v in vals):
            continue
        print(f"{k:<22}" + "".join(f"{'—' if v is None else f'{v:.4f}':>12}" for v in vals))
    print(m["headline"])
    if m.get("quant_report"):
        print(f"quantization report: {run.root / 'eval' / m['quant_report']['md']}")
    return 0


def _quant(args) -> int:
    from pathlib import Path

    from dsft.cli_common import parse_overrides
    from dsft.config import load_config
    from dsft.errors import DataError
    from dsft.eval.variants import measure_export
    from dsft.records import read_records_file

    if not args.predictions:
        raise DataError("dsft eval quant: give the export folder (e.g. dsft eval quant out/ --eval-data held_out.jsonl)")
    cfg = load_config(None, parse_overrides(args.overrides))
    records, labels = read_records_file(args.eval_data) if args.eval_data else (None, None)
    rep = measure_export(cfg, Path(args.predictions), records=records, labels=labels)
    if args.json:
        print(json.dumps(rep, ensure_ascii=False))
    else:
        print(f"quantization report: {Path(args.predictions) / rep['md']} ({len(rep['rows'])} variants)")
    return 0


def _score(args) -> int:
    from dsft.errors import DataError
    from dsft.eval.score import format_table, parse_metrics, score_file

    if not args.predictions:
        raise DataError("dsft eval score: give a predictions file (e.g. dsft eval score preds.jsonl --metrics bleu,rouge_l)")
    names = parse_metrics(args.metrics)
    scores = score_file(args.predictions, names, args.lang)
    if args.json:
        print(json.dumps(scores if len(scores) > 1 else next(iter(scores.values())), ensure_ascii=False))
    else:
        print(format_table(scores, names))
    return 0
