"""Helpers for train tests: real records from the shipped medical subset, a run dir with a data manifest."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dsft.config import config_from_dict
from dsft.model.paths import assets_dir
from dsft.records import label_prompt_messages, qa_messages
from dsft.run import RunDir, write_jsonl


def medical_records(n: int, *, with_label_task: bool = True) -> list[dict]:
    """The first n QA rows of the shipped GB18030 CSV as canonical records (+ derived department questions)."""
    raw = (assets_dir() / "data" / "medical_qa_subset.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(raw)))[:n]
    out = []
    for i, r in enumerate(rows, start=2):
        fields = {"question": r["title"], "context": r["ask"], "answer": r["answer"]}
        rec = {"id": f"subset:{i}", "messages": qa_messages(fields), "fields": fields, "label": r["department"],
               "domain": r["department"], "provenance": "original"}
        out.append(rec)
        if with_label_task:
            msgs = label_prompt_messages(rec, "{question}\n请问这个问题应该挂哪个科室？")
            out.append({**rec, "id": rec["id"] + "#label", "provenance": "derived:label_task",
                        "messages": [*msgs, {"role": "assistant", "content": r["department"]}]})
    return out


def make_run(root: Path, records: list[dict], eval_records: list[dict] | None = None) -> RunDir:
    run = RunDir(root)
    d = run.stage_dir("data")
    write_jsonl(d / "train.jsonl", records)
    write_jsonl(d / "eval.jsonl", eval_records or [])
    run.write_manifest("data", {"train": "train.jsonl", "test": "eval.jsonl", "eval": "eval.jsonl",
                                "counts": {"train": len(records)}})
    return run


def tiny_cfg(run_root: Path, **train) -> object:
    base = {"run_dir": str(run_root), "data": {"max_seq_length": 192},
            "train": {"logging_steps": 1, "save_steps": 1000, "report_to": ["none"], **train}}
    return config_from_dict(base)


class Crash(Exception):
    """A simulated crash raised inside the training loop by `crash_at`."""


def crash_at(step_no: int):
    """A trainer fault_hook that raises Crash when the loop reaches step `step_no`."""
    def hook(step, micro):
        if step == step_no:
            raise Crash
    return hook
