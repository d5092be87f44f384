"""Fixtures for train tests (helpers live in train_helpers.py)."""

from __future__ import annotations

import pytest
from train_helpers import medical_records


@pytest.fixture(scope="session")
def records16() -> list[dict]:
    return medical_records(8)
