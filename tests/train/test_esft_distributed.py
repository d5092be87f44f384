"""ESFT under `dsft train --nproc 2` on CPU (gloo) with DDP, FSDP2 and DeepSpeed ZeRO-2/3: the 1-process loss curve at
the same global batch, only the selected experts change (every other tensor bitwise), and the 2-process checkpoint
resumes in one process on the same curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import STRATEGIES, losses, train_two
from esft_helpers import build_moe
from safetensors.torch import load_file
from train_helpers import make_run

from dsft.config import config_from_dict
from dsft.run import RunDir
from dsft.train import train

pytestmark = pytest.mark.slow

EXPERTS = {1: [0, 3], 2: [5]}


def _cfg(root: Path, base: Path, **train_kw) -> dict:
    return {"run_dir": str(root), "model": {"name_or_path": str(base)}, "data": {"max_seq_length": 160},
            "train": {"method": "esft", "max_steps": 4, "save_steps": 2, "logging_steps": 1, "report_to": ["none"],
                      "per_device_train_batch_size": 2, **train_kw},
            "esft": {"experts": {str(k): v for k, v in EXPERTS.items()}}}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, records16):
    """The base and the 1-process run at the same global batch (micro-batch 2 × accumulation 2)."""
    root = tmp_path_factory.mktemp("esft_dist")
    base = build_moe(root / "base", "deepseek_v3")
    make_run(root / "one", records16)
    train(config_from_dict(_cfg(root / "one", base, gradient_accumulation_steps=2)), RunDir(root / "one"),
          progress=False)
    return {"root": root, "base": base}


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_esft_two_processes_match_one_change_only_the_experts_and_resume(one_process, records16, name):
    if name.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'dsft[deepspeed]')")
    root, base = one_process["root"], one_process["base"]
    run = root / name
    make_run(run, records16)
    out = train_two(root / f"{name}.yaml", _cfg(run, base, **STRATEGIES[name]))
    assert "plain data parallel" not in out.stdout + out.stderr
    m2 = json.loads((run / "train/manifest.json").read_text())
    assert m2["processes"]["world"] == 2 and m2["effective_batch"] == 4 and m2["method"] == "esft"
    if name == "fsdp":
        assert 0.4 < m2["processes"]["local_param_fraction"] < 0.6  # each rank holds half the weights
    l2, l1 = losses(run / "train"), losses(root / "one/train")
    assert l2.keys() == l1.keys() == set(range(1, 5))
    assert max(abs(l2[k] - l1[k]) for k in l1) < 1e-4

    # the merged model: the selected experts' rows changed, every other tensor (router, attention, the other experts,
    # embeddings …) bitwise the base's; the delta = the 1-process delta up to float summation order
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(run / "train/model/model.safetensors"))
    expect = {f"model.layers.{li}.mlp.experts.{e}.{p}_proj.weight" for li, es in EXPERTS.items() for e in es
              for p in ("gate", "up", "down")}
    assert before.keys() == after.keys()
    assert {k for k in before if not torch.equal(before[k], after[k])} == expect
    d2 = load_file(str(run / "train/esft/esft_delta.safetensors"))
    d1 = load_file(str(root / "one/train/esft/esft_delta.safetensors"))
    assert d2.keys() == d1.keys() == expect
    assert max(float((d2[k] - d1[k]).abs().max()) for k in d1) < 1e-4

    ck = load_file(str(run / "train/checkpoints/checkpoint-2/trainable.safetensors"))
    assert ck and all(".esft_" in k for k in ck)  # the checkpoint holds the selected experts only, gathered
    res = root / f"{name}_res"
    make_run(res, records16)
    m = train(config_from_dict(_cfg(res, base, gradient_accumulation_steps=2)), RunDir(res), progress=False,
              resume=str(run / "train/checkpoints/checkpoint-2"))
    assert m["steps"] == 4
    lr = losses(res / "train")
    assert set(lr) == {3, 4} and max(abs(lr[k] - l2[k]) for k in lr) < 1e-4
