"""The trainer's shape: a state object saved by name, one hyperparameter function, short functions, a light CLI."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import Crash, crash_at, make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.train import run as train_run
from dsft.train.hparams import hyperparameters
from dsft.train.state import EarlyStopping, Ladder

TRAIN_SRC = Path(__file__).resolve().parents[2] / "src" / "dsft" / "train"


def test_early_stopping_counts_evaluations_without_improvement():
    es = EarlyStopping(patience=2, delta=0.1)
    assert [es.update(v) for v in (5.0, 4.0, 3.95, 3.99)] == [False, False, False, True]
    assert es.best == 4.0 and es.bad == 2
    up = EarlyStopping(metric="rouge_l", greater_is_better=True, patience=1)
    assert up.best == -math.inf and not up.update(0.2) and up.update(0.1)
    again = EarlyStopping(patience=2, delta=0.1)
    again.load_state_dict(json.loads(json.dumps(es.state_dict())))
    assert (again.best, again.bad) == (4.0, 2)
    assert not EarlyStopping().update(1.0)  # no patience configured: never stops


def test_ladder_rungs_round_trip_by_name():
    lad = Ladder(micro_batch=4)
    assert lad.next_rung(None).startswith("micro-batch halved to 2")
    fresh = Ladder(micro_batch=4)
    fresh.load_state_dict(lad.state_dict(), model=None)
    assert fresh.state_dict() == {"micro_batch": 2, "gradient_checkpointing": False, "offload": False}


def test_hyperparameters_fill_open_values_from_the_preset_in_one_place(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path)})
    tiny, big = hyperparameters(cfg, 3_000_000), hyperparameters(cfg, 7_000_000_000)
    assert (tiny.preset, tiny.learning_rate, tiny.lora_r, tiny.lora_alpha, tiny.modules_to_save) == ("tiny", 2e-3, 16, 32, "default")
    assert (big.preset, big.learning_rate, big.lora_r, big.modules_to_save, big.adam_beta2) == ("7B", 3e-5, 32, [], 0.999)
    full = config_from_dict({"run_dir": str(tmp_path), "train": {"method": "full", "learning_rate": 1e-4},
                             "lora": {"r": 4}})
    hp = hyperparameters(full, 3_000_000)
    assert (hp.learning_rate, hp.lora_r, hp.lora_alpha, hp.adam_beta2) == (1e-4, 4, 8, 0.95)
    uses = [p.name for p in TRAIN_SRC.glob("*.py") if "preset_for(" in p.read_text(encoding="utf-8")]
    assert sorted(uses) == ["hparams.py"]


def test_checkpoint_state_holds_each_component_by_name(tmp_path, records16):
    run = make_run(tmp_path, records16)
    with pytest.raises(Crash):
        train_run(tiny_cfg(tmp_path, max_steps=6, save_steps=2, per_device_train_batch_size=2), run,
                  fault_hook=crash_at(3), progress=False)
    st = json.loads((tmp_path / "train/checkpoints/checkpoint-2/state.json").read_text())
    assert st["step"] == 2 and st["data_position"] == {"next_step": 2} and st["scheduler"]["step"] == 2
    assert {"micro_batch", "gradient_checkpointing", "offload", "best_eval", "bad_evals", "history", "rng",
            "dataset", "effective_batch", "method", "total_steps", "train_seconds"} <= st.keys()
    assert [h["step"] for h in st["history"]] == [1, 2] and "grad_scaler" not in st  # fp32: no loss scaling


def test_stage_functions_read_in_one_sitting():
    """stage/recipe/loop/state/setup/step: no function over 80 lines (the 308-line train() is gone)."""
    long = []
    for name in ("stage.py", "recipe.py", "loop.py", "state.py", "setup.py", "step.py", "outputs.py", "console.py"):
        tree = ast.parse((TRAIN_SRC / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
    assert not (TRAIN_SRC / "trainer.py").exists()


def test_cli_and_package_import_no_torch():
    code = "import sys, dsft.train, dsft.train.cli, dsft.train.stage; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(TRAIN_SRC.parents[1]), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
