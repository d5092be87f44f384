"""dsft.plan.stage.run: the pipeline's plan stage writes plan.txt / plan.json and its manifest, once."""

from __future__ import annotations

import json

import pytest

from dsft.config import config_from_dict
from dsft.errors import OverwriteError
from dsft.plan.stage import run
from dsft.run import RunDir


def test_stage_writes_plan_and_manifest(tmp_path, capsys):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "plan": {"gpu": "24GB"}})  # the embedded model
    rd = RunDir(cfg.run_dir)
    m = run(cfg, rd)
    assert set(m) == {"plan_json", "plan_txt", "fits", "verdict", "peak_bytes", "max_micro_batch", "device"}
    out = tmp_path / "run" / "plan"
    assert (out / "plan.txt").read_text().startswith("dsft plan") and m["fits"] and m["device"] == "24GB"
    d = json.loads((out / "plan.json").read_text())
    assert d["memory_bytes"]["peak"] == m["peak_bytes"] and d["verdict"] == m["verdict"]
    assert rd.read_manifest("plan") == {"stage": "plan", **m} and "verdict: FITS" in capsys.readouterr().out
    with pytest.raises(OverwriteError):
        run(cfg, rd)
    assert run(cfg, rd, force=True) == m
