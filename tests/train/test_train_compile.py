"""`train.compile: true` (torch.compile, inductor on CPU) trains and gives the eager loss curve within float tolerance."""

from __future__ import annotations

import pytest
from train_helpers import make_run, medical_records, tiny_cfg

from dsft.train import train


def _losses(root, compile_: bool) -> list[float]:
    import json

    run = make_run(root, medical_records(4))
    train(tiny_cfg(root, max_steps=2, compile=compile_, per_device_train_batch_size=4), run)
    return [json.loads(ln)["loss"] for ln in (root / "train" / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_compiled_loop_matches_eager(tmp_path):
    eager = _losses(tmp_path / "eager", False)
    compiled = _losses(tmp_path / "compiled", True)  # the fused head + loss runs outside the graph
    assert len(compiled) == len(eager) == 2
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)  # same weights, same batch: same loss
    assert compiled[1] == pytest.approx(eager[1], rel=1e-3)  # one AdamW step later: kernel rounding only
