"""CLI of the data stage (arguments and printing only): `dsft data prepare|stats|dedup|split`."""

from __future__ import annotations

import argparse
import json

from dsft.cli_common import add_config_args, config_and_run

EXAMPLES = """examples:
  dsft data prepare examples/demo.yaml                 # → runs/demo/data/{train,test,eval}.jsonl + data_report.{json,md}
  dsft data prepare cfg.yaml --strict                  # stop at the first invalid record (file:line: reason)
  dsft data prepare cfg.yaml --set data.path=../shared/data/alpaca_zh_demo.json --force
  dsft data stats ../shared/data/medical_dialogue_internal_medicine.gb18030.csv
"""


def register(sub) -> None:
    p = sub.add_parser("data", help="read, validate, dedup, filter, balance and split SFT data",
                       description="Data stage: any SFT format/encoding → canonical JSONL records with a report.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    pp = dsub.add_parser("prepare", help="run the whole data stage of a config",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(pp)
    pp.add_argument("--strict", action="store_true", help="fail on the first invalid record instead of rejecting it")
    pp.add_argument("--engine", choices=["local", "ray"], help="run the batch steps locally (default) or on Ray Data")
    pp.set_defaults(func=_prepare)
    ps = dsub.add_parser("stats", help="print a summary of a data file (counts, lengths, labels)")
    ps.add_argument("input", nargs="+", help="data file(s) or embedded:medical")
    ps.add_argument("--encoding", default="auto")
    ps.add_argument("--format", default="auto", help="auto, seed, alpaca, sharegpt, openai, text")
    ps.add_argument("--label-field", default="domain")
    ps.add_argument("--tokenizer", help="also count tokens: a tokenizer folder or DeepSeek name (e.g. deepseek-v3)")
    ps.add_argument("--json", action="store_true", help="print JSON instead of text")
    ps.set_defaults(func=_stats)
    pd = dsub.add_parser("dedup", help="MinHash + LSH near-duplicate removal of one file (CJK-aware)",
                         epilog="example:\n  dsft data dedup ../shared/data/medical_dialogue_internal_medicine.gb18030.csv "
                                "-o /tmp/dedup.jsonl --fields answer --threshold 0.8",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pd.add_argument("input", nargs="+", help="data file(s) in any supported format")
    pd.add_argument("-o", "--output", required=True, help="kept records as canonical JSONL")
    pd.add_argument("--duplicates", help="where to list removed records (default: OUTPUT with .duplicates.jsonl)")
    pd.add_argument("--threshold", type=float, default=0.8)
    pd.add_argument("--fields", default="question,answer", help="canonical fields compared (default question,answer)")
    pd.add_argument("--ngram", type=int, default=5, help="character n-gram size for CJK text (default 5)")
    pd.add_argument("--word-ngram", type=int, default=3, help="word n-gram size for space-separated text (default 3)")
    pd.add_argument("--num-perm", type=int, default=128)
    pd.add_argument("--bands", type=int, help="LSH bands (default: derived from --threshold)")
    pd.add_argument("--verify", choices=["exact", "minhash", "none"], default="exact")
    pd.add_argument("--encoding", default="auto")
    pd.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    pd.set_defaults(func=_dedup)
    pl = dsub.add_parser("split", help="stream-split a canonical JSONL larger than memory (shuffle buffer)",
                         epilog="example:\n  dsft data split big.jsonl -o splits/ --test-size 0.1 --buffer 10000",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("input", help="canonical JSONL (e.g. a data stage's train.jsonl, or `dsft data dedup` output)")
    pl.add_argument("-o", "--output", required=True, help="folder for train.jsonl, test.jsonl, eval.jsonl")
    pl.add_argument("--test-size", type=float, default=0.1)
    pl.add_argument("--eval-size", type=float, default=0.0)
    pl.add_argument("--buffer", type=int, default=10_000, help="shuffle buffer in records (default 10000)")
    pl.add_argument("--seed", type=int, default=42)
    pl.add_argument("--force", action="store_true", help="overwrite existing split files")
    pl.set_defaults(func=_split)
    from dsft.data.distill.cli import register_distill

    register_distill(dsub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _prepare(args) -> int:
    from dsft.data.stage import run

    if args.strict:
        args.overrides.append("data.strict=true")
    if args.engine:
        args.overrides.append(f"data.engine={args.engine}")
    cfg, run_dir = config_and_run(args)
    m = run(cfg, run_dir, force=args.force)
    c = m["counts"]
    print(f"data: {c['input']} in → {c['kept']} kept; dropped {json.dumps(c['dropped'], ensure_ascii=False)}")
    print(f"split: train {c['train']} (+{c['derived']} derived), test {c['test']}, eval {c['eval']}; "
          f"{len(m['labels'])} labels")
    print(f"→ {run_dir.root / 'data'}  (report: {run_dir.root / 'data' / 'data_report.md'})")
    return 0


def _stats(args) -> int:
    from dsft.data.stats import stats_for_paths, stats_text

    st = stats_for_paths(args.input, encoding=args.encoding, fmt=args.format, label_field=args.label_field,
                          tokenizer=args.tokenizer)
    print(json.dumps(st, ensure_ascii=False, indent=2) if args.json else stats_text(st))
    return 0


def _dedup(args) -> int:
    from pathlib import Path

    from dsft.data.dedup import dedup_files

    r = dedup_files(args.input, Path(args.output), Path(args.duplicates) if args.duplicates else None,
                    threshold=args.threshold, fields=[f.strip() for f in args.fields.split(",") if f.strip()],
                    ngram=args.ngram, word_ngram=args.word_ngram, num_perm=args.num_perm, bands=args.bands,
                    verify=args.verify, encoding=args.encoding, force=args.force)
    st = r["stats"]
    print(f"{r['records']} records ({r['invalid']} invalid skipped) → {r['kept']} kept, {r['removed']} near-duplicates "
          f"removed in {r['seconds']:.2f} s ({st['bands']}×{st['rows']} bands, {st.get('candidate_pairs', 0)} candidate pairs)")
    print(f"→ {r['output']}\n→ {r['duplicates']}")
    return 0


def _split(args) -> int:
    from pathlib import Path

    from dsft.data.split import split_jsonl

    out = Path(args.output)
    counts = split_jsonl(Path(args.input), out, test_size=args.test_size, eval_size=args.eval_size, seed=args.seed,
                         buffer=args.buffer, force=args.force)
    print(f"train {counts['train']}, test {counts['test']}, eval {counts['eval']} → {out}")
    return 0
