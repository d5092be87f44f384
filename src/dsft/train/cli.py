"""CLI of the 'train' stage: `dsft train CONFIG [--resume auto|DIR] [--resume-force] [--nproc N]`."""

from __future__ import annotations

import argparse
import os

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
    p.add_argument("--force-template", action="store_true",
                   help="train even if the ids training gives a conversation differ from the chat template's "
                        "inference ids (= --set model.force_template=true; `dsft doctor MODEL_DIR` shows where)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes (GPUs) on this machine: re-runs under `accelerate launch` with a config generated "
                        "from train.strategy (ddp/fsdp/deepspeed); default train.nproc")
    p.set_defaults(func=_run)
    from dsft.cli_common import config_and_run
    from dsft.train import esft_cli  # `dsft esft …` (profile, merge) lives beside the train stage

    esft_cli.register(sub, add_config_args=add_config_args, config_and_run=config_and_run)


def _run(args) -> int:
    from dsft.cli_common import config_and_run
    from dsft.train.stage import run as train

    if args.force_template:
        args.overrides.append("model.force_template=true")
    cfg, run = config_and_run(args)
    nproc = args.nproc or cfg.train.nproc
    if (nproc > 1 or cfg.train.num_machines > 1) and "LOCAL_RANK" not in os.environ:
        from dsft.train.dist import launch

        return launch(cfg, _worker_argv(args), nproc=nproc)
    m = train(cfg, run, resume=args.resume, force=args.force, resume_force=args.resume_force)
    if int(os.environ.get("RANK", "0")):
        return 0
    where = m["adapter"] or m["model"]
    print(f"dsft train: {m['steps']} steps, loss {m['loss_first']:.4f} → {m['loss_last']:.4f}, "
          f"{m['tokens_per_s']} tokens/s → {run.root / 'train' / where}")
    return 0


def _worker_argv(args) -> list[str]:
    """The same command line for each worker, without --nproc."""
    argv = [args.config] if args.config else []
    if args.run_dir:
        argv += ["--run-dir", args.run_dir]
    for item in args.overrides:
        argv += ["--set", item]
    if args.force:
        argv.append("--force")
    if args.resume:
        argv += ["--resume", args.resume]
    if args.resume_force:
        argv.append("--resume-force")
    return argv
