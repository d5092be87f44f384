"""Helpers for eval tests: real medical records and a run directory with data/train manifests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dsft.model.paths import assets_dir
from dsft.records import qa_messages
from dsft.run import RunDir, write_jsonl

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16)


def real_records(n: int, *, start: int = 0, per_label: int | None = None) -> list[dict]:
    """Canonical records from the packaged real medical QA subset (GB18030 CSV)."""
    path = assets_dir() / "data" / "medical_qa_subset.gb18030.csv"
    out, seen = [], {}
    with open(path, encoding="gb18030", newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), 2):
            if line - 2 < start:
                continue
            if per_label is not None:
                if seen.get(row["department"], 0) >= per_label:
                    continue
                seen[row["department"]] = seen.get(row["department"], 0) + 1
            fields = {"context": row["ask"], "question": row["title"], "answer": row["answer"][:80]}
            out.append({"id": f"{path.name}:{line}", "messages": qa_messages(fields), "fields": fields,
                        "label": row["department"], "domain": row["department"], "difficulty": None,
                        "source": {"file": path.name, "line": line}, "provenance": "original", "tools": None})
            if len(out) >= n:
                break
    return out


def make_run(root: Path, model_dir: Path, adapter_dir: Path, records: list[dict], *, train_records: list[dict] | None = None) -> RunDir:
    """A run directory with data and train manifests as the data/train stages write them."""
    import shutil

    run = RunDir(root)
    d = run.stage_dir("data")
    write_jsonl(d / "test.jsonl", records)
    write_jsonl(d / "train.jsonl", train_records or [])
    labels = sorted({r["label"] for r in records})
    run.write_manifest("data", {"train": "train.jsonl", "test": "test.jsonl", "eval": None, "labels": labels,
                                "label_field": "domain", "counts": {"test": len(records)}})
    t = run.stage_dir("train")
    shutil.copytree(adapter_dir, t / "adapter")
    (t / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - 0.3 * s, "lr": 1e-3}) + "\n" for s in range(1, 9))
                                 + json.dumps({"step": 8, "event": "eval", "eval_loss": 3.1}) + "\n"
                                 + json.dumps({"step": 8, "event": "early_stop", "eval_loss": 3.1, "best": 3.0}) + "\n",
                                 encoding="utf-8")
    run.write_manifest("train", {"base_model": str(model_dir), "method": "lora", "adapter": "adapter", "model": None,
                                 "steps": 8, "loss_first": 4.7, "loss_last": 2.6, "log": "log.jsonl"})
    return run
