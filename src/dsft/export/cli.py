"""CLI of the 'export' stage: `dsft export CONFIG` or `dsft export --model DIR [--adapter DIR] -o OUT`."""

from __future__ import annotations

import argparse
import json

from dsft.cli_common import add_config_args, config_and_run
from dsft.errors import ExportError

EXAMPLES = """examples:
  dsft export examples/demo.yaml                       # merge the run's adapter → <run_dir>/export/merged
  dsft export examples/demo.yaml --set export.dtype=bfloat16 --force
  dsft export examples/demo.yaml --formats merged,int8,int4,gguf-q4_k_m --report --force
  dsft export --model BASE_DIR --adapter ADAPTER_DIR -o out/   # no config/run needed: out/merged, out/manifest.json
"""


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="merge the adapter into the base and save plain-transformers / quantized variants",
        description="Merge LoRA/DoRA into a 16/32-bit base, save safetensors + tokenizer + chat template + "
                    "generation_config (loadable by plain transformers), check merged vs adapter logits.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--model", help="base (or fully fine-tuned) model folder; export without a run directory")
    p.add_argument("--adapter", help="PEFT adapter folder to merge into --model")
    p.add_argument("-o", "--out", help="output folder for --model mode (gets merged/, variants, manifest.json)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of merged/ (export.dtype)")
    p.add_argument("--formats", help="comma-separated variants: merged,int8,int4,nf4,bnb-int8,gguf-f16,gguf-q8_0,gguf-q4_k_m")
    p.add_argument("--report", action="store_true", help="measure every variant → quant_report.json/.md/.png (export.report)")
    p.add_argument("--eval-data", metavar="JSONL",
                   help="--model mode: held-out records (dsft records with `messages`, or seed rows with question/answer[/domain]) "
                        "for the merge check and the report (default: 3 built-in probe conversations)")
    p.add_argument("--install-gguf-converter", metavar="PATH",
                   help="copy llama.cpp's convert_hf_to_gguf.py from a llama.cpp folder or the llama-cpp-python sdist "
                        "(.tar.gz) into $DSFT_HOME/llama.cpp, then exit")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.install_gguf_converter:
        from dsft.export.gguf import install_converter

        print(f"llama.cpp converter installed in {install_converter(args.install_gguf_converter)}")
        return 0
    if args.dtype:
        args.overrides.append(f"export.dtype={args.dtype}")
    if args.formats:
        args.overrides.append(f"export.formats=[{args.formats}]")
    if args.report:
        args.overrides.append("export.report=true")
    if args.model:
        return _run_direct(args)
    if args.adapter or args.out:
        raise ExportError("--adapter and -o/--out go with --model DIR (or give a CONFIG and use its run directory)")
    from dsft.export import export

    cfg, run = config_and_run(args)
    m = export(cfg, run, force=args.force)
    print(json.dumps(_summary(m, run.root / "export"), ensure_ascii=False, indent=2))
    return 0


def _run_direct(args) -> int:
    from pathlib import Path

    from dsft.cli_common import parse_overrides
    from dsft.config import load_config
    from dsft.export import export_model
    from dsft.run import atomic_write_json

    if not args.out:
        raise ExportError("--model needs -o/--out OUT (the folder that receives merged/ and the variants)")
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.force:
        raise ExportError(f"{out} already holds an export; pass --force to overwrite it")
    cfg = load_config(args.config, parse_overrides(args.overrides))
    records, labels = _read_records(Path(args.eval_data)) if args.eval_data else (None, None)
    m = export_model(args.model, out, cfg, adapter_dir=args.adapter, records=records, labels=labels, force=args.force)
    atomic_write_json(out / "manifest.json", {"stage": "export", **m})
    print(json.dumps(_summary(m, out), ensure_ascii=False, indent=2))
    return 0


def _read_records(path) -> tuple[list[dict], list[str] | None]:
    """Records from a JSONL of dsft records (`messages`) or seed rows (question/answer[/context][/domain])."""
    from dsft.records import qa_messages

    if not path.exists():
        raise ExportError(f"--eval-data {path}: file not found")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}:{i}: not valid JSON ({err.msg})") from err
        if isinstance(row, dict) and row.get("messages"):
            records.append(row)
        elif isinstance(row, dict) and row.get("question") and row.get("answer"):
            fields = {k: row.get(k) for k in ("question", "context", "answer") if row.get(k)}
            records.append({"messages": qa_messages(fields), "fields": fields, "label": row.get("label") or row.get("domain")})
        else:
            raise ExportError(f"{path}:{i}: expected a record with 'messages' or 'question' + 'answer'")
    if not records:
        raise ExportError(f"--eval-data {path}: no records")
    labels = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    return records, labels if len(labels) >= 2 else None


def _summary(m: dict, out) -> dict:
    return {"merged": str(out / m["merged"]), "dtype": m["dtype"], "max_abs_diff": m["max_abs_diff"],
            "variants": [{k: v.get(k) for k in ("name", "path", "size_bytes")} for v in m["variants"]]}
