"""CLI of `dsft demo`: the whole pipeline on the embedded default, offline, on CPU, with a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsft.cli_common import parse_overrides

EXAMPLE = """example:
  dsft demo                       # writes runs/demo/{plan,data,train,eval,export,serve}/ and runs/demo/report.{json,md}
  dsft demo --out /tmp/d --force  # elsewhere, overwriting an earlier demo there
  dsft demo --print-config        # the embedded config it runs (a starting point for your own)
"""


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "demo.yaml"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default (CPU, offline)",
                       description="plan → data → train → eval → export → serve on a tiny DeepSeek-V3 and real Chinese medical "
                                   "QA shipped inside dsft; writes report.json and report.md.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier demo in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the embedded config and exit")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.print_config:
        sys.stdout.write(demo_config_path().read_text(encoding="utf-8"))
        return 0
    from dsft.config import load_config
    from dsft.pipeline import run_pipeline
    from dsft.report.run_report import build_report, write_report
    from dsft.run import RunDir

    overrides = parse_overrides(args.overrides)
    overrides["run_dir"] = args.out
    cfg = load_config(demo_config_path(), overrides)
    run = RunDir(cfg.run_dir)
    print(f"dsft demo → {run.root}  (embedded tiny DeepSeek-V3 + {cfg.data.path}; CPU, offline)")
    results = run_pipeline(cfg, run, force=args.force, on_stage=lambda s, m, t: print(f"[{s}] done in {t:.1f} s"))
    rep = build_report(cfg, results)
    jp, mp = write_report(run.root, rep)
    b, a = rep["eval"]["before"], rep["eval"]["after"]
    print(f"data: {rep['data']['input']} in → {rep['data']['kept']} kept; "
          f"train loss {rep['train']['loss_first']:.3f} → {rep['train']['loss_last']:.3f}")
    print(f"eval (base → fine-tuned): accuracy {b.get('accuracy', 0):.1%} → {a.get('accuracy', 0):.1%}, "
          f"ROUGE-L {b.get('rouge_l', 0):.4f} → {a.get('rouge_l', 0):.4f}")
    print(f"serve: ok={rep['serve']['ok']}  total {rep['timings']['total']:.0f} s")
    print(f"report: {jp}  {mp}")
    return 0
