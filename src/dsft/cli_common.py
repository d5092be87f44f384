"""Arguments every stage command shares: CONFIG, --run-dir, --set overrides, --force; the config is resolved once."""

from __future__ import annotations

import argparse

from dsft.config import Config, load_config
from dsft.config.resolve import resolve_and_record
from dsft.config.yaml_io import parse_overrides  # noqa: F401  (stage CLIs take it from here)
from dsft.run import RunDir


def add_config_args(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", metavar="CONFIG",
                   help="YAML config (dsft layout or the seed's training_args/data_args layout)" + ("" if config_required else "; default: the embedded demo"))
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite a stage's existing output")


ANNOUNCING_COMMANDS = ("data", "train", "run")
"""Commands that print the resolved preset line (stdout: human text); eval/export keep stdout for their JSON."""


def resolved_for_run(cfg: Config, run: RunDir, *, announce: bool = True) -> Config:
    """The config with every default resolved (dsft.config.resolve), written to <run_dir>/resolved_config.yaml."""
    from dsft.model.base_checkpoint import checkpoint_line
    from dsft.model.info import read_model_info

    out = resolve_and_record(cfg, run.root, read_model_info(cfg.model.name_or_path),
                             echo=None if announce else (lambda _line: None))
    if announce and (line := checkpoint_line(cfg.model.name_or_path)):
        print(f"dsft: {line}", flush=True)  # e.g. "FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept, 163 shards"
    return out


def config_and_run(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Load the config named on the command line (+ overrides), resolve it and open its run directory."""
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if getattr(args, "run_dir", None):
        overrides["run_dir"] = args.run_dir
    cfg = load_config(getattr(args, "config", None), overrides)
    run = RunDir(cfg.run_dir)
    return resolved_for_run(cfg, run, announce=getattr(args, "command", None) in ANNOUNCING_COMMANDS), run
