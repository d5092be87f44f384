"""Cost and effect of train.mtp_loss_weight on the tiny shipped FP8 DeepSeek-V3 (CPU): seconds per step, LM and MTP loss.

Trains LoRA on the same 8 medical QA records (the shipped GB18030 subset) with mtp_loss_weight 0 and λ, the same
steps, batch, lr and seed, and prints per-step median seconds, the first/last LM loss and the first/last MTP loss.
Timings on a shared CPU are noisy: the load average is printed beside them. Last line: JSON.

    .venv/bin/python benchmarks/mtp_loss.py --steps 6 --weight 0.3
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _records(n: int) -> list[dict]:
    from dsft.model.paths import assets_dir
    from dsft.records import qa_messages

    raw = (assets_dir() / "data" / "medical_qa_subset.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(raw)))[:n]
    return [{"id": f"subset:{i}", "messages": qa_messages({"question": r["title"], "context": r["ask"],
                                                           "answer": r["answer"]}), "provenance": "original"}
            for i, r in enumerate(rows)]


def _one(root: Path, base: Path, weight: float, steps: int) -> dict:
    from dsft.config import config_from_dict
    from dsft.run import RunDir, write_jsonl
    from dsft.train import train

    run = RunDir(root)
    d = run.stage_dir("data")
    recs = _records(8)
    write_jsonl(d / "train.jsonl", recs)
    write_jsonl(d / "eval.jsonl", [])
    run.write_manifest("data", {"train": "train.jsonl", "test": "eval.jsonl", "eval": "eval.jsonl",
                                "counts": {"train": len(recs)}})
    cfg = config_from_dict({"run_dir": str(root), "model": {"name_or_path": str(base)},
                            "data": {"max_seq_length": 128},
                            "train": {"mtp_loss_weight": weight, "max_steps": steps, "per_device_train_batch_size": 4,
                                      "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0,
                                      "logging_steps": 1, "save_steps": 1000, "report_to": ["none"]}})
    stamps: list[float] = []  # one micro-batch per step (batch 4, accumulation 1): the hook marks each step's start
    t0 = time.perf_counter()
    train(cfg, run, progress=False, fault_hook=lambda step, micro: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    log = [json.loads(ln) for ln in (root / "train/log.jsonl").read_text().splitlines() if '"loss"' in ln]
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    out = {"weight": weight, "total_s": round(total, 1), "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
           "load": os.getloadavg()[0]}
    if times:
        out["step_s_median"] = round(statistics.median(times), 2)
    if weight:
        out.update(mtp_first=log[0]["mtp_loss"], mtp_last=log[-1]["mtp_loss"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--weight", type=float, default=0.3)
    a = ap.parse_args()
    from dsft.model.shipped import write_shipped

    with tempfile.TemporaryDirectory() as tmp:
        base = write_shipped(Path(tmp) / "v3")
        res = [_one(Path(tmp) / f"w{w}", base, w, a.steps) for w in (0.0, a.weight)]
    for r in res:
        print(r)
    print(json.dumps({"mtp_loss": res}))


if __name__ == "__main__":
    main()
