"""`dsft demo` end to end (shortened run): every stage runs for real and report.json carries the promised keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# The full demo trains for ~3 minutes; here the same pipeline runs on fewer samples and steps.
SHORT = ["data.max_samples=500", "train.max_steps=40", "train.save_steps=20", "eval.max_samples=12",
         "eval.max_new_tokens=16"]


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    sets = [a for s in SHORT for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dsft", "demo", "--out", str(out), *sets],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))

    for stage in ("plan", "data", "train", "eval", "export", "serve"):
        assert (out / stage / "manifest.json").is_file(), stage
        assert stage in rep["timings"]
    assert rep["plan"]["fits"] is True
    d = rep["data"]
    assert d["input"] == 1667  # the packaged subset; max_samples shows up as a drop reason
    assert d["dropped"]["max_samples"] == 1667 - 500
    assert d["kept"] <= 500 and d["train"] + d["test"] == d["kept"]
    assert d["input"] == d["kept"] + sum(d["dropped"].values())
    t = rep["train"]
    assert t["steps"] == 40
    assert t["loss_last"] < t["loss_first"]
    b, a = rep["eval"]["before"], rep["eval"]["after"]
    for k in ("rouge_l", "accuracy", "loss", "bleu", "macro_f1"):
        assert isinstance(b[k], float) and isinstance(a[k], float), k
    assert a["loss"] < b["loss"]  # held-out loss falls even after a short run
    assert rep["export"]["max_abs_diff"] < 1e-3
    assert rep["serve"]["ok"] is True
    assert rep["serve"]["bad_request_status"] == 400 and rep["serve"]["openai_chat_status"] == 200
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "export" / "merged" / "model.safetensors").is_file()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "accuracy" in md and "ROUGE-L" in md

    # a second demo into the same folder is refused without --force (nothing overwritten)
    again = subprocess.run([sys.executable, "-m", "dsft", "demo", "--out", str(out), *sets],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2
    assert "--force" in again.stderr and "Traceback" not in again.stderr
