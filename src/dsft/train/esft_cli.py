"""CLI of ESFT (arguments and printing only): `dsft esft profile CONFIG`, `dsft esft merge DELTA -o DIR`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

EXAMPLES = """examples:
  dsft esft profile examples/esft_deepseek_v2_lite.yaml     # scores + heatmap + chosen experts → <run_dir>/esft/
  dsft train examples/esft_deepseek_v2_lite.yaml            # train.method esft: profiles (or reuses) and trains
  dsft esft merge runs/esft/train/esft -o runs/esft/merged  # base + delta → a plain model folder, shard by shard
  dsft serve --esft runs/esft/train/esft                    # base + delta served without a merged copy
"""


def register(sub, *, add_config_args: Callable, config_and_run: Callable) -> None:
    """Add `dsft esft` (called by train/cli.py, which hands over the shared CLI helpers)."""
    p = sub.add_parser("esft", help="Expert-Specialized Fine-Tuning for DeepSeek MoE: profile experts, merge deltas",
                       description="ESFT (arXiv 2407.01906): score each routed expert on the task's data, train only "
                                   "the relevant ones (train.method esft), ship a small expert delta.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="esft_command", metavar="SUBCOMMAND", required=True)
    prof = esub.add_parser("profile", help="score the base model's routed experts on the run's train.jsonl",
                           description="Run the base over esft.sample_tokens tokens of <run_dir>/data/train.jsonl; "
                                       "write <run_dir>/esft/expert_scores.json, expert_config.json and "
                                       "expert_scores.png; print the experts esft.score / esft.top_p choose.")
    add_config_args(prof)
    prof.set_defaults(func=lambda args: _profile(args, config_and_run))
    merge = esub.add_parser("merge", help="merge an ESFT delta into its base → a plain model folder",
                            description="Write base + delta to OUT one safetensors shard at a time (the base's "
                                        "other files are copied); the base's replaced tensors are checked first.")
    merge.add_argument("delta", metavar="DELTA", help="the delta folder (<run_dir>/train/esft)")
    merge.add_argument("-o", "--output", required=True, metavar="DIR", help="the merged model folder to write")
    merge.add_argument("--base", metavar="DIR", help="the base model folder (default: the one the delta names)")
    merge.add_argument("--force", action="store_true", help="overwrite a non-empty DIR")
    merge.set_defaults(func=_merge)


def _profile(args, config_and_run: Callable) -> int:
    from dsft.train.esft_select import profile_run

    cfg, run = config_and_run(args)
    _, esft_dir = profile_run(cfg, run)
    print(f"dsft esft: wrote {esft_dir / 'expert_scores.json'}, expert_config.json, expert_scores.png")
    return 0


def _merge(args) -> int:
    from dsft.model.esft_delta import merge_delta

    res = merge_delta(args.delta, args.output, base=args.base, force=args.force)
    print(f"dsft esft: merged {res['replaced_tensors']} tensors of {res['delta']} into {res['base_model']} "
          f"→ {res['merged']}")
    return 0
