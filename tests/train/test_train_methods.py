"""Every method runs on the tiny DeepSeek-V3: LoRA/rsLoRA/DoRA adapters, full and freeze models (QLoRA: test_train_qlora.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.model.load import resolve_model_dir
from dsft.train import train


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method,lora", [("lora", {"use_rslora": True}), ("dora", {})])
def test_adapter_methods(tmp_path, records16, method, lora):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, method=method, max_steps=2)
    cfg = config_from_dict({**cfg.model_dump(), "lora": {"r": 4, **lora}})
    m = train(cfg, run)
    ac = json.loads((tmp_path / "train/adapter/adapter_config.json").read_text())
    assert ac["use_dora"] is (method == "dora") and ac["use_rslora"] is bool(lora.get("use_rslora"))
    assert ac["r"] == 4 and ac["lora_alpha"] == 8
    assert m["method_info"]["targets"]["expert_parameters"] == (0 if method == "dora" else 6)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_write_a_model(tmp_path, records16, method):
    run = make_run(tmp_path, records16)
    cfg = tiny_cfg(tmp_path, method=method, max_steps=2, freeze_trainable_layers=1, learning_rate=1e-3)
    m = train(cfg, run)
    assert m["adapter"] is None and m["model"] == "model"
    base = _weights(resolve_model_dir("embedded:tiny-deepseek-v3"))
    new = _weights(tmp_path / "train/model")
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert not any(".mlp.gate." in k for k in changed)  # router frozen
    if method == "full":
        assert "model.embed_tokens.weight" in changed and any("layers.0." in k for k in changed)
    else:
        assert changed and all(k.startswith("model.layers.3.") for k in changed)
        assert m["trainable_params"] < m["total_params"] / 4
