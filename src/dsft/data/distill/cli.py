"""`dsft data distill CONFIG` (arguments and printing only): sample a teacher, verify, mix (docs/distill.md)."""

from __future__ import annotations

import argparse
import json

from dsft.cli_common import add_config_args, config_and_run

EXAMPLES = """examples:
  DEEPSEEK_API_KEY=... dsft data distill examples/distill_r1_medical.yaml    # sample → verify → mix
  dsft data distill cfg.yaml                         # again after a crash or a spent budget: resumes, none twice
  dsft data distill cfg.yaml --no-sample --set distill.verify.max_per_prompt=1   # re-verify / re-mix only
  dsft data distill cfg.yaml --force                 # forget the earlier samples and start over
"""


def register_distill(dsub) -> None:
    """Add the `distill` subcommand to `dsft data`."""
    pd = dsub.add_parser("distill", help="sample reasoning traces from an OpenAI-compatible teacher, verify, mix",
                         description="Prompts of distill.input → N teacher samples each (bounded concurrency, "
                                     "retries, budget, resumable) → verified and filtered traces → a mix with "
                                     "non-reasoning records. Output: <run_dir>/distill/ (mixed.jsonl for training).",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(pd, config_required=True)
    pd.add_argument("--no-sample", action="store_true",
                    help="send nothing to the teacher: verify and mix what samples.jsonl holds")
    pd.set_defaults(func=_distill)


def _distill(args) -> int:
    from dsft.data.distill.main import run_distill

    cfg, run_dir = config_and_run(args)
    m = run_distill(cfg, run_dir, force=args.force, sample=not args.no_sample)
    c, mx, b = m["counts"], m["mix"], m["budget"]
    print(f"distill: {m['done']} of {m['prompts']} prompts sampled ({m['pending']} pending); "
          f"{b['tokens']:,} tokens" + (f", {b['cost']:.4f} {b['currency']}" if b["cost"] else ""))
    print(f"verify: {c['samples']} samples → {c['kept']} kept; dropped {json.dumps(c['dropped'], ensure_ascii=False)}")
    print(f"mix: {mx['reasoning']} reasoning + {mx['non_reasoning']} non-reasoning (reasoning share "
          f"{mx['share_actual']}, target {mx['share_target']})")
    print(f"→ {m['out_dir']}/{m['mixed']}  (report: {m['out_dir']}/{m['report_html']})")
    if m["stopped"]:
        print(f"stopped: {m['stopped']}; run the same command again to resume")
    return 1 if m["failed"] else 0
