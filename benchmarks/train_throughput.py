"""Training throughput: plain HF Trainer + PEFT LoRA on padded batches vs `dsft train`, same model, samples and batch.

Both sides: the same tiny DeepSeek-V3-shape model (random init, fixed seed), the same real medical QA samples
rendered with the DeepSeek-V3 chat template (labels only on the answer), the same LoRA (r 16 on the MLA
projections), the same effective batch, learning rate and cosine schedule, one epoch, fp32 on CPU.
Reported: real (non-pad) tokens per second of training-loop time, and each side's final loss — the mean
token loss of the trained model over all the training samples, computed the same way for both. Each side runs once per training seed (default 3: data order, dropout and
LoRA init differ per seed, so one run's loss difference is mostly which samples came last); the ratio is the median
over seeds and the losses are means.

    PYTHONPATH=src python benchmarks/train_throughput.py [--samples 128] [--batch 8] [--seeds 3] [--tokenizer deepseek-v3|embedded]

Last line: JSON {"baseline_tokens_per_s", "dsft_tokens_per_s", "ratio", "baseline_loss", "dsft_loss", "loss_delta_per_seed", ...}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "medical_dialogue_internal_medicine.gb18030.csv"


def load_records(n: int) -> list[dict]:
    """First n rows of the real medical QA CSV (shared data if present, else the packaged subset)."""
    from dsft.model.paths import assets_dir
    from dsft.records import qa_messages

    path = DATA if DATA.exists() else assets_dir() / "data" / "medical_qa_subset.gb18030.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_bytes().decode("gb18030"))))
    out = []
    for i, r in enumerate(rows[:n]):
        f = {"question": r.get("title", ""), "context": r.get("ask", ""), "answer": r.get("answer", "")}
        out.append({"id": f"{path.name}:{i + 2}", "messages": qa_messages(f), "fields": f})
    return out, path.name


def build_model_dir(root: Path, tokenizer: str) -> Path:
    from dsft.model.tiny import build_tiny_deepseek_v3
    from dsft.model.tokenizer import resolve_tokenizer_path

    return build_tiny_deepseek_v3(root / "model", seed=0, tokenizer_dir=resolve_tokenizer_path(tokenizer))


def final_loss(model, examples, pad_id: int) -> float:
    """Token-mean loss of a trained model over the given examples (padded batches of 8, eval mode)."""
    import torch

    from dsft.train.batching import collate_padded
    from dsft.train.loss import CausalLMLoss

    lm = CausalLMLoss(model)
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            chunk = examples[i:i + 8]
            tot += float(lm(collate_padded(chunk, pad_id)))
            n += sum(e.n_labels for e in chunk)
    return tot / n


def run_baseline(model_dir: Path, examples, args, out_dir: Path) -> dict:
    """What users write by hand: Trainer + PEFT LoRA + DataCollatorForSeq2Seq (pad to the longest in the batch)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=MLA, task_type="CAUSAL_LM"))
    ds = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=int(0.03 * -(-len(ds) // args.batch)), weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    real = sum(len(e.input_ids) for e in examples)
    return {"tokens_per_s": real / secs, "seconds": secs, "cpu_seconds": cpu,
            "loss": final_loss(model, examples, tok.pad_token_id)}


def run_dsft(model_dir: Path, records, args, root: Path) -> dict:
    """`dsft train` defaults (packing, labels-only LM head, …) with the baseline's LoRA, batch and schedule."""
    from dsft.config import config_from_dict
    from dsft.model.adapters import load_adapter
    from dsft.model.load import load_model
    from dsft.model.tokenizer import load_tokenizer
    from dsft.run import RunDir, write_jsonl
    from dsft.train import train
    from dsft.train.encode import encode_records

    run = RunDir(root / "run")
    write_jsonl(run.stage_dir("data") / "train.jsonl", records)
    run.write_manifest("data", {"train": "train.jsonl"})
    cfg = config_from_dict({
        "run_dir": str(run.root), "model": {"name_or_path": str(model_dir)},
        "data": {"max_seq_length": args.max_len},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.03, "report_to": ["none"], "save_steps": 10**6,
                  "seed": args.seed, "compile": args.compile},
        "lora": {"r": 16, "alpha": 32, "target_modules": MLA, "modules_to_save": []},
    })
    m = train(cfg, run, progress=False)
    tok = load_tokenizer(str(model_dir))
    examples, _ = encode_records(tok, records, args.max_len)
    model = load_adapter(load_model(model_dir, dtype="float32"), run.root / "train" / "adapter")
    real = sum(len(e.input_ids) for e in examples)
    return {"tokens_per_s": real / m["loop_seconds"], "seconds": m["loop_seconds"], "cpu_seconds": m["loop_cpu_seconds"],
            "loss": final_loss(model, examples, tok.pad_token_id)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=42, help="first training seed")
    p.add_argument("--seeds", type=int, default=3, help="training seeds to run (ratio: median; loss: mean)")
    p.add_argument("--tokenizer", default="deepseek-v3",
                   help="the real DeepSeek-V3 tokenizer (129 k vocabulary, the shared notes' baseline setting; default) "
                        "or embedded (the demo's 8 k vocabulary)")
    p.add_argument("--compile", action="store_true", help="dsft side: torch.compile (inductor)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import statistics

    import torch

    from dsft.model.tokenizer import load_tokenizer
    from dsft.train.encode import encode_records

    seeds = [args.seed + k for k in range(args.seeds)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsft-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_model_dir(root, args.tokenizer)
        records, source = load_records(args.samples)
        tok = load_tokenizer(str(model_dir))
        examples, _ = encode_records(tok, records, args.max_len)
        n_params = sum(x.numel() for x in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(next(model_dir.glob("*.safetensors")))).values())
        real = sum(len(e.input_ids) for e in examples)
        padded = sum(max(len(e.input_ids) for e in examples[i:i + args.batch]) * len(examples[i:i + args.batch])
                     for i in range(0, len(examples), args.batch))
        print(f"model: tiny DeepSeek-V3 shape, {n_params / 1e6:.1f} M params, vocab {len(tok)}; data: {len(examples)} "
              f"samples of {source}, {real} real tokens; batch {args.batch}; torch threads {torch.get_num_threads()}; "
              f"training seeds {seeds} (data order, dropout and LoRA init differ per seed; the model is the same)",
              flush=True)
        print(f"padding in input order would add {padded / real - 1:.0%} (the baseline pads each shuffled batch)", flush=True)
        for seed in seeds:
            args.seed = seed
            base = run_baseline(model_dir, examples, args, root / f"hf{seed}")
            print(f"seed {seed} baseline (HF Trainer + PEFT, padded): {base['tokens_per_s']:.0f} real tokens/s, "
                  f"{base['seconds']:.1f} s ({base['cpu_seconds']:.1f} s CPU), final loss {base['loss']:.4f}", flush=True)
            cand = run_dsft(model_dir, records, args, root / f"dsft{seed}")
            print(f"seed {seed} dsft train (packed, labels-only head):  {cand['tokens_per_s']:.0f} real tokens/s, "
                  f"{cand['seconds']:.1f} s ({cand['cpu_seconds']:.1f} s CPU), final loss {cand['loss']:.4f}", flush=True)
            rows.append((base, cand))
    ratios = [c["tokens_per_s"] / b["tokens_per_s"] for b, c in rows]
    cpu_ratios = [b["cpu_seconds"] / c["cpu_seconds"] for b, c in rows]
    base_loss = statistics.fmean(b["loss"] for b, _ in rows)
    dsft_loss = statistics.fmean(c["loss"] for _, c in rows)
    deltas = [c["loss"] - b["loss"] for b, c in rows]
    spread = statistics.stdev([b["loss"] for b, _ in rows]) if len(rows) > 1 else float("nan")
    ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
    print(f"ratio (median of {len(rows)}): {ratio:.2f}x wall-clock [{min(ratios):.2f}-{max(ratios):.2f}], {cpu_ratio:.2f}x by "
          f"process CPU time (robust to a busy machine); mean final loss baseline {base_loss:.4f}, dsft {dsft_loss:.4f} "
          f"(per-seed dsft - baseline: {', '.join(f'{d:+.4f}' for d in deltas)}; baseline seed-to-seed sd {spread:.4f}); "
          f"goal >= 3.0 with equal or lower loss")
    print(json.dumps({"baseline_tokens_per_s": round(statistics.median(b["tokens_per_s"] for b, _ in rows), 1),
                      "dsft_tokens_per_s": round(statistics.median(c["tokens_per_s"] for _, c in rows), 1),
                      "ratio": round(ratio, 3), "cpu_time_ratio": round(cpu_ratio, 3), "seeds": len(rows),
                      "baseline_loss": round(base_loss, 4), "dsft_loss": round(dsft_loss, 4),
                      "loss_delta_per_seed": [round(d, 5) for d in deltas]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
