"""CLI of the 'train' stage: `dsft train CONFIG [--resume auto|DIR] [--resume-force] [--nproc N]`."""

from __future__ import annotations

import argparse

from dsft.cli_common import add_config_args

EXAMPLES = """examples:
  dsft train examples/demo.yaml                      # LoRA on the data stage's train.jsonl
  dsft train examples/demo.yaml --resume auto        # continue from the newest intact checkpoint
  dsft train cfg.yaml --set train.method=dora --set train.max_steps=200
"""


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune (LoRA/DoRA/QLoRA/full/freeze) on the data stage's output",
                       description="Fine-tune the configured model on <run_dir>/data/train.jsonl; writes "
                                   "<run_dir>/train/{adapter|model, checkpoints, log.jsonl, loss.png, tb, manifest.json}.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", metavar="auto|DIR", help="continue from the newest intact checkpoint (auto) or a checkpoint folder")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even if the dataset or the effective batch changed since the checkpoint")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dsft.cli_common import config_and_run
    from dsft.train import train

    cfg, run = config_and_run(args)
    m = train(cfg, run, resume=args.resume, force=args.force, resume_force=args.resume_force)
    where = m["adapter"] or m["model"]
    print(f"dsft train: {m['steps']} steps, loss {m['loss_first']:.4f} → {m['loss_last']:.4f}, "
          f"{m['tokens_per_s']} tokens/s → {run.root / 'train' / where}")
    return 0
