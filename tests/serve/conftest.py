"""Shared fixtures: a tiny DeepSeek-V3 model folder and one live dsft server on loopback for the session."""

from __future__ import annotations

import pytest

from dsft.config import ServeConfig
from dsft.model.tiny import build_tiny_deepseek_v3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_deepseek_v3(tmp_path_factory.mktemp("serve-model") / "tiny-ds3", seed=0)


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    """A live server (real uvicorn, loopback, free port) over the tiny model."""
    from dsft.serve import serve_in_background

    cfg = ServeConfig(port=0, served_model_name="tiny", max_batch_size=8, max_queue=64)
    with serve_in_background(str(tiny_model_dir), cfg) as url:
        yield url

