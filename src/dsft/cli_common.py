"""Arguments every stage command shares: CONFIG, --run-dir, --set overrides, --force."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from dsft.config import Config, load_config
from dsft.errors import ConfigError
from dsft.run import RunDir


def add_config_args(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", metavar="CONFIG",
                   help="YAML config (dsft layout or the seed's training_args/data_args layout)" + ("" if config_required else "; default: the embedded demo"))
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite a stage's existing output")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.max_steps=20)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def config_and_run(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Load the config named on the command line (+ overrides) and open its run directory."""
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if getattr(args, "run_dir", None):
        overrides["run_dir"] = args.run_dir
    cfg = load_config(getattr(args, "config", None), overrides)
    return cfg, RunDir(cfg.run_dir)
