"""CLI of the 'export' stage: `dsft export CONFIG` or `dsft export --model DIR [--adapter DIR] -o OUT`."""

from __future__ import annotations

import argparse
import json

from dsft.cli_common import add_config_args, config_and_run
from dsft.errors import ConfigError, ExportError

EXAMPLES = """examples:
  dsft export examples/demo.yaml                       # merge the run's adapter → <run_dir>/export/merged
  dsft export examples/demo.yaml --set export.dtype=bfloat16 --force
  dsft export examples/demo.yaml --formats merged,fp16,bf16,int8,int4,gguf-q4_k_m --force
  dsft eval examples/demo.yaml --variants              # then measure them: quant_report.* (export.report) in <run_dir>/eval
  dsft export --model BASE_DIR --adapter ADAPTER_DIR -o out/   # no config/run needed: out/merged, out/manifest.json
  dsft export --model DeepSeek-V3 --adapter ADAPTER_DIR -o out/ --dtype fp8   # sharded/FP8 base: merged shard by shard
  dsft eval quant out/ --eval-data held_out.jsonl      # …and measure that export folder
"""
REPORT_MOVED = ("the quantization report is measured by the eval stage now: run `dsft eval CONFIG --variants` after "
                "`dsft export` (with export.report: true), or `dsft eval quant OUT_DIR [--eval-data JSONL]` for an "
                "--model export; `dsft run` does it after export")


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="merge the adapter into the base and save plain-transformers / quantized variants",
        description="Merge LoRA/DoRA into a 16/32-bit base, save safetensors + tokenizer + chat template + "
                    "generation_config (loadable by plain transformers), check merged vs adapter logits, write the "
                    "variants. `dsft eval` measures them (quantization report).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--model", help="base (or fully fine-tuned) model folder; export without a run directory")
    p.add_argument("--adapter", help="PEFT adapter folder to merge into --model")
    p.add_argument("-o", "--out", help="output folder for --model mode (gets merged/, variants, manifest.json)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "fp8"],
                   help="dtype of merged/ (export.dtype); fp8: a shipped FP8 base merged shard by shard, FP8 kept")
    p.add_argument("--formats", help="comma-separated variants: merged,fp16,bf16,int8,int4,nf4,bnb-int8,gguf-f16,gguf-q8_0,gguf-q4_k_m")
    p.add_argument("--report", action="store_true", help="moved: the eval stage measures the variants (dsft eval CONFIG --variants)")
    p.add_argument("--eval-data", metavar="JSONL",
                   help="--model mode: held-out records (dsft records with `messages`, or seed rows with question/answer[/domain]) "
                        "for the merge check (default: 3 built-in probe conversations)")
    p.add_argument("--install-gguf-converter", metavar="PATH",
                   help="copy llama.cpp's convert_hf_to_gguf.py from a llama.cpp folder or the llama-cpp-python sdist "
                        "(.tar.gz) into $DSFT_HOME/llama.cpp, then exit")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.install_gguf_converter:
        from dsft.export.gguf import install_converter

        print(f"llama.cpp converter installed in {install_converter(args.install_gguf_converter)}")
        return 0
    if args.report:
        raise ConfigError(f"dsft export --report: {REPORT_MOVED}")
    if args.dtype:
        args.overrides.append(f"export.dtype={args.dtype}")
    if args.formats:
        args.overrides.append(f"export.formats=[{args.formats}]")
    if args.model:
        return _run_direct(args)
    if args.adapter or args.out:
        raise ExportError("--adapter and -o/--out go with --model DIR (or give a CONFIG and use its run directory)")
    from dsft.export.stage import run

    cfg, run_dir = config_and_run(args)
    m = run(cfg, run_dir, force=args.force)
    print(json.dumps(_summary(m, run_dir.root / "export"), ensure_ascii=False, indent=2))
    return 0


def _run_direct(args) -> int:
    from pathlib import Path

    from dsft.cli_common import parse_overrides
    from dsft.config import load_config
    from dsft.export.stage import export_direct

    if not args.out:
        raise ExportError("--model needs -o/--out OUT (the folder that receives merged/ and the variants)")
    cfg = load_config(args.config, parse_overrides(args.overrides))
    m = export_direct(cfg, args.model, Path(args.out), adapter=args.adapter, eval_data=args.eval_data, force=args.force)
    print(json.dumps(_summary(m, Path(args.out)), ensure_ascii=False, indent=2))
    return 0


def _summary(m: dict, out) -> dict:
    return {"merged": str(out / m["merged"]), "dtype": m["dtype"], "max_abs_diff": m["max_abs_diff"],
            "variants": [{k: v.get(k) for k in ("name", "path", "size_bytes")} for v in m["variants"]]}
