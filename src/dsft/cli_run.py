"""CLI of `dsft run`: every stage of a config in order (plan → data → train → eval → export → serve check)."""

from __future__ import annotations

import argparse

from dsft.cli_common import add_config_args, config_and_run
from dsft.errors import ConfigError

EXAMPLE = """example:
  dsft run examples/demo.yaml --run-dir runs/mine
  dsft run my.yaml --stages data,train      # only some stages (each reads the previous manifest)
"""


def register(sub) -> None:
    p = sub.add_parser("run", help="run every stage of a config in order",
                       description="Run plan → data → train → eval → export → serve-check for one config, writing "
                                   "each stage's outputs and manifest under the run directory, then report.json/md.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--stages", default="plan,data,train,eval,export,serve",
                   help="comma-separated subset of plan,data,train,eval,export,serve (default: all)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dsft.pipeline import run_pipeline
    from dsft.report.run_report import PIPELINE, build_report, write_report

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in PIPELINE]
    if bad:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(bad)} (accepted: {', '.join(PIPELINE)})")
    cfg, run = config_and_run(args)
    results = run_pipeline(cfg, run, stages=stages, force=args.force, on_stage=_say)
    jp, mp = write_report(run.root, build_report(cfg, results))
    print(f"report: {jp} and {mp}")
    return 0


def _say(stage: str, manifest: dict, seconds: float) -> None:
    print(f"[{stage}] done in {seconds:.1f} s")
