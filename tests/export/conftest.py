"""Fixtures of the export tests: a tiny DeepSeek-V3 and a LoRA adapter with nonzero B (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_helpers import make_lora_adapter


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from dsft.model.tiny import build_tiny_deepseek_v3

    return build_tiny_deepseek_v3(tmp_path_factory.mktemp("base") / "tiny-v3", seed=1)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "adapter")
