"""CLI of `dsft model`: `import FILE.gguf -o DIR` (dequantize a GGUF into a training base) and `info FILE.gguf`."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  dsft model info gemma-3-270m-q4_k_m.gguf                     # architecture, quant type, template, importable?
  dsft model import gemma-3-270m-q4_k_m.gguf -o models/gemma3-270m
  dsft model import DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf -o models/r1-1.5b --dtype bfloat16
  # or set model.name_or_path: path/to/file.gguf in a config: imported once into $DSFT_HOME/models/gguf/
"""


def register(sub) -> None:
    p = sub.add_parser("model", help="import GGUF checkpoints as training bases (dequantized safetensors folders)",
                       description="Models from files: dequantize a GGUF checkpoint (llama.cpp's format) through "
                                   "transformers into a safetensors folder dsft can train, evaluate and export.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    imp = msub.add_parser("import", help="GGUF file → safetensors folder (+ tokenizer, chat template, provenance)",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("gguf", metavar="FILE.gguf")
    imp.add_argument("-o", "--out", required=True, help="output folder (a Hugging Face model folder)")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the dequantized weights (default float32: exact for every GGUF block type; "
                          "bfloat16 halves disk and memory)")
    imp.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    imp.add_argument("--json", action="store_true", help="print the provenance note as JSON")
    imp.set_defaults(func=_import)
    info = msub.add_parser("info", help="what a GGUF file holds, and whether dsft can import it")
    info.add_argument("gguf", metavar="FILE.gguf")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _import(args) -> int:
    from dsft.model.gguf_import import import_gguf

    note = import_gguf(args.gguf, args.out, dtype=args.dtype, force=args.force)
    if args.json:
        print(json.dumps(note, ensure_ascii=False, indent=2))
        return 0
    print(f"imported {note['source']} ({note['architecture']}, {note['quant_type']}, sha256 {note['sha256'][:16]}…)")
    print(f"  → {args.out}: {note['model_type']}, {note['n_params'] / 1e6:.1f} M parameters in {note['dtype']}, "
          f"chat template: {note['chat_template'] or 'none (set model.chat_template)'}; "
          f"reload check max |Δ logits| = {note['reload_max_abs_diff']:.2e}; {note['seconds']} s")
    if not note["tested_in_dsft"]:
        print(f"  note: GGUF architecture '{note['architecture']}' is read by transformers but untested in dsft")
    return 0


def _info(args) -> int:
    from dsft.errors import ModelError
    from dsft.model.gguf_import import check_importable, read_gguf_header

    h = read_gguf_header(args.gguf)
    try:
        check_importable(args.gguf, h)
        h["importable"] = True
    except ModelError as err:
        h["importable"] = str(err)
    if args.json:
        print(json.dumps(h, ensure_ascii=False, indent=2))
        return 0
    types = ", ".join(f"{k} ×{v}" for k, v in h["tensor_types"].items())
    print(f"{args.gguf}: GGUF v{h['version']}, architecture {h['architecture']}, name {h['name']!r}, {h['file_type']}")
    print(f"  {h['n_tensors']} tensors ({types}); {h['block_count']} layers, context {h['context_length']}; "
          f"tokenizer {h['tokenizer_model']}, chat template {'present' if h['chat_template'] else 'absent'}")
    print(f"  importable: {'yes' if h['importable'] is True else h['importable']}")
    return 0
