"""CLI of the data stage: `dsft data prepare CONFIG`, `dsft data stats INPUT`."""

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
    ps.add_argument("--json", action="store_true", help="print JSON instead of text")
    ps.set_defaults(func=_stats)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _prepare(args) -> int:
    from dsft.data import prepare

    if args.strict:
        args.overrides.append("data.strict=true")
    if args.engine:
        args.overrides.append(f"data.engine={args.engine}")
    cfg, run = config_and_run(args)
    m = prepare(cfg, run, force=args.force)
    c = m["counts"]
    print(f"data: {c['input']} in → {c['kept']} kept; dropped {json.dumps(c['dropped'], ensure_ascii=False)}")
    print(f"split: train {c['train']} (+{c['derived']} derived), test {c['test']}, eval {c['eval']}; "
          f"{len(m['labels'])} labels")
    print(f"→ {run.root / 'data'}")
    return 0


def _stats(args) -> int:
    from dsft.data.stats import stats_for_paths, stats_text

    st = stats_for_paths(args.input, encoding=args.encoding, fmt=args.format, label_field=args.label_field)
    print(json.dumps(st, ensure_ascii=False, indent=2) if args.json else stats_text(st))
    return 0
