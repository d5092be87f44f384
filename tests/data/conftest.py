"""Shared fixtures of the data-stage tests: the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")


def shared_file(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} not present (the real data of ../shared/data)")
    return p


@pytest.fixture
def medical_csv() -> Path:
    return shared_file("medical_dialogue_internal_medicine.gb18030.csv")


@pytest.fixture
def alpaca_json() -> Path:
    return shared_file("alpaca_zh_demo.json")


@pytest.fixture
def sharegpt_json() -> Path:
    return shared_file("sharegpt_toolcall_zh_demo.json")
