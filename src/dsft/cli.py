"""Thin CLI: parse args, load the config, call one stage function, print a summary."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dsft import __version__
from dsft.errors import DsftError

# Each stage module exposes `register(subparsers)`; the parser it adds sets `func(args) -> int`.
STAGE_CLIS = ["demo", "run", "plan", "data", "train", "eval", "export", "serve", "deploy", "ui", "model", "doctor"]

EPILOG = """examples:
  dsft demo                          # the whole pipeline on the embedded default (CPU, offline)
  dsft run examples/demo.yaml        # every stage of a config, in order
  dsft data prepare examples/demo.yaml
  dsft train examples/demo.yaml --resume auto
  dsft eval score preds.jsonl --metrics bleu,rouge_l --lang zh
  dsft serve --model runs/demo/export/merged --port 8000
  dsft doctor runs/demo/export/merged   # training and serving render chats to the same token ids?
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsft",
        description="dsft: from raw domain data to a fine-tuned, compressed, served DeepSeek model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dsft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_CLIS:
        mod = importlib.import_module(f"dsft.cli_{name}" if name in ("demo", "run") else f"dsft.{name}.cli")
        mod.register(sub)
    return parser


def _quiet_third_party() -> None:
    """Keep the console to dsft's own progress: no per-request HTTP logs, weight-loading bars or deprecation chatter."""
    import warnings

    for name in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes' CPU backend (imported by peft) warns that the optional hub `kernels` speed-up is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*")


def _pin_deepspeed_accelerator() -> None:
    """No GPU device node: tell DeepSpeed (imported by transformers/peft when installed) it is on CPU, so it does not
    print its 'unable to detect' warning to stdout, where it would break `--json` and export's JSON summary."""
    if "DS_ACCELERATOR" in os.environ or os.environ.get("CUDA_VISIBLE_DEVICES", "unset") not in ("", "-1", "unset"):
        return
    from pathlib import Path

    if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/kfd").exists():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DSFT_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO if not debug else logging.DEBUG, format="%(message)s")
    _pin_deepspeed_accelerator()
    if not debug:
        _quiet_third_party()
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DsftError as err:
        if debug:
            raise
        print(f"dsft: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dsft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
