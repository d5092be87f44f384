"""benchmarks/esft_vs_lora.py: disjoint splits on the real corpora, the goal verdict, the lr grids, a --quick run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "esft_vs_lora.py"


def bench():
    spec = importlib.util.spec_from_file_location("esft_vs_lora", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def need_data(mod) -> None:
    for name in ("medical_dialogue_internal_medicine.gb18030.csv", "alpaca_zh_demo.json"):
        if not (mod.DATA / name).exists():
            pytest.skip(f"{mod.DATA / name} not present (the real data of ../shared/data)")


def test_splits_are_disjoint_and_sized_as_asked():
    mod = bench()
    need_data(mod)
    args = mod.parse_args(["--eval", "50", "--val", "30", "--ft-records", "400", "--pretrain-medical", "700"])
    s = mod.splits(args)
    assert [len(s[k]) for k in ("med_test", "gen_test", "med_val", "med_ft")] == [50, 50, 30, 400]
    ids = {k: {r["id"] for r in v} for k, v in s.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], f"{a} and {b} share records"
    assert sum(r["domain"] == "medical" for r in s["pretrain"]) == 700
    assert sum(r["domain"] == "general" for r in s["pretrain"]) == 1000 - 50  # alpaca_zh_demo minus its test part


def row(method: str, domain: float, forgetting: float, trainable: int) -> dict:
    return {"method": method, "domain_loss": domain, "forgetting": forgetting, "trainable_params": trainable}


def test_verdict_checks_each_goal_against_full_and_lora():
    mod = bench()
    rows = [row("full", 6.00, 0.40, 1000), row("lora", 6.05, 0.10, 300),
            row("esft-token", 6.11, 0.05, 250), row("esft-gate", 6.13, 0.21, 251)]
    v = mod.verdict(rows)
    assert v["esft-token"] == {"domain_within_2pct_of_full": True, "forgetting_le_half_full": True,
                               "forgetting_below_lora": True, "trainable_le_25pct_full": True}
    assert v["esft-gate"] == {"domain_within_2pct_of_full": False, "forgetting_le_half_full": False,
                              "forgetting_below_lora": False, "trainable_le_25pct_full": False}


def test_lr_grid_per_method_and_one_grid_override():
    mod = bench()
    args = mod.parse_args([])
    assert mod.lr_grid("full", args) == [1e-4, 3e-4, 1e-3]
    assert mod.lr_grid("esft-token", args) == mod.lr_grid("lora", args) == [1e-3, 3e-3, 1e-2]
    args = mod.parse_args(["--lr", "2e-3,5e-3"])
    assert mod.lr_grid("full", args) == mod.lr_grid("esft-gate", args) == [2e-3, 5e-3]


@pytest.mark.slow
def test_quick_run_trains_through_dsft_and_reports(tmp_path, capsys, monkeypatch):
    """The smoke run end to end with two methods: pre-training, a worker per method, the table and the JSON line."""
    mod = bench()
    need_data(mod)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert mod.main(["--quick", "--work", str(tmp_path), "--methods", "esft-token,full"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by = {r["method"]: r for r in out["rows"]}
    assert set(by) == {"esft-token", "full"}
    assert by["esft-token"]["trainable_params"] < 0.25 * by["full"]["trainable_params"]
    assert (tmp_path / "esft-token-lr0.003" / "train" / "esft" / "esft_delta.safetensors").exists()
    assert by["full"]["domain_loss"] < out["before"]["domain"]  # 12 steps of full fine-tuning lower the domain loss
    assert out["pretrain"]["loss_last"] < out["pretrain"]["loss_first"]
    assert set(out["routing"]) and out["cpu_seconds"] > 0
