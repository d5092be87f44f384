"""QLoRA for real on this machine: NF4 base via bitsandbytes (GPU, or its CPU backend), LoRA trains, adapter reloads."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from train_helpers import make_run, tiny_cfg

from dsft.errors import TrainError
from dsft.model.adapters import load_adapter
from dsft.model.load import load_model, resolve_model_dir
from dsft.train import train

TEXT = "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办？<｜Assistant｜>多休息，多喝水。<｜end▁of▁sentence｜>"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def test_qlora_trains_and_its_adapter_loads_on_the_fp32_base(tmp_path, records16):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'dsft[qlora]')")
    run = make_run(tmp_path, records16)
    m = train(tiny_cfg(tmp_path, method="qlora", max_steps=6, learning_rate=2e-3), run)
    assert m["method"] == "qlora" and m["adapter"] == "adapter" and m["steps"] == 6
    assert math.isfinite(m["loss_first"]) and math.isfinite(m["loss_last"])
    assert m["loss_last"] < m["loss_first"] - 0.3, (m["loss_first"], m["loss_last"])
    ac = json.loads((tmp_path / "train/adapter/adapter_config.json").read_text())
    assert ac["r"] == m["method_info"]["r"] and "kv_b_proj" in json.dumps(ac["target_modules"])

    base_dir = resolve_model_dir("embedded:tiny-deepseek-v3")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(base_dir))(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = load_model(base_dir, dtype="float32").eval()
    before = _logits(base, ids)
    tuned = load_adapter(base, tmp_path / "train/adapter").eval()
    after = _logits(tuned, ids)
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-2  # the NF4-trained adapter changes the fp32 model's outputs
    nll = torch.nn.functional.cross_entropy(after[:-1], ids[0, 1:])
    assert float(nll) < float(torch.nn.functional.cross_entropy(before[:-1], ids[0, 1:]))  # and towards the data


def test_qlora_base_is_nf4(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'dsft[qlora]')")
    from bitsandbytes.nn import Linear4bit

    from dsft.config import config_from_dict
    from dsft.train.setup import load_base as _load_base

    cfg = config_from_dict({"run_dir": str(tmp_path), "train": {"method": "qlora"}})
    model = _load_base(cfg, resolve_model_dir("embedded:tiny-deepseek-v3"), torch.device("cpu"))
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(q) == 4 * 5 + 3 + 3 * 3  # MLA projections, the dense MLP, the shared experts
    assert all(m.compute_dtype == torch.float32 for m in q) or torch.cuda.is_available()
    # fused 3-D experts are not nn.Linear: they stay float
    assert any(p.ndim == 3 and p.is_floating_point() for n, p in model.named_parameters() if ".experts." in n)


def test_qlora_without_bitsandbytes_says_pip_in_one_line(tmp_path, records16, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError, as when absent
    run = make_run(tmp_path, records16)
    with pytest.raises(TrainError, match=r"qlora needs bitsandbytes: pip install 'bitsandbytes>=") as e:
        train(tiny_cfg(tmp_path, method="qlora", max_steps=1), run)
    assert "\n" not in str(e.value)
