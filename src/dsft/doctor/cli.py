"""CLI of `dsft doctor MODEL_DIR`: print the template parity table of a model folder; exit 1 when a path differs."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  dsft doctor runs/demo/export/merged              # the folder's tokenizer + chat template
  dsft doctor models/r1-distill-qwen-7b --json     # the whole table for tools
  dsft doctor models/base --chat-template r1-distill   # as `dsft serve --chat-template r1-distill` would serve it
"""


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check that training and serving render a model's chats to the same token ids",
                       description="Template parity of a model folder: for dsft's probe conversations (single and "
                                   "multi-turn, system prompt, thinking, tool call) the ids the train stage trains "
                                   "on, the default engine's prompt, the template vLLM is given and the Ollama "
                                   "Modelfile export writes must equal the tokenizer's own apply_chat_template. "
                                   "Exit 0 when they all agree, 1 when a path differs, 2 on bad input.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model (or tokenizer) folder with a chat template")
    p.add_argument("--chat-template", metavar="NAME", help="a DeepSeek template name overriding the folder's")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dsft.doctor.check import doctor

    table = doctor(args.model_dir, chat_template=args.chat_template)
    if args.json:
        print(json.dumps(table.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(f"dsft doctor: template parity of {args.model_dir} ({table.template})")
        for line in table.lines():
            print("  " + line)
        notes = sorted({c.note for c in table.checks if c.status == "n/a" and c.note})
        if any(c.status == "n/a" and c.path == "modelfile" for c in table.checks):
            notes.append("modelfile n/a: no Go toolchain on PATH to render the Modelfile's Go template")
        for n in notes:
            print(f"  note: {n}")
        print(f"dsft doctor: {'ok' if table.ok else table.failure_line()}")
    return 0 if table.ok else 1
