"""train.mtp_loss_weight on a shipped FP8 DeepSeek-V3 folder: the MTP loss falls and is logged, the adapter holds the
MTP layer's LoRA under checkpoint names, resume stays bit-exact, and the streaming export merges exactly the MTP
tensors the adapter touches (re-quantized FP8) while every other MTP tensor stays bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run, medical_records, tiny_cfg

from dsft.config import config_from_dict
from dsft.errors import TrainError
from dsft.export.stream_merge import stream_merge
from dsft.model.shipped import write_shipped
from dsft.train import train

MTP = "model.layers.3."


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return write_shipped(tmp_path_factory.mktemp("fp8") / "v3")


def _cfg(root: Path, model_dir: Path, **train_kw):
    cfg = tiny_cfg(root, **train_kw).model_dump(mode="json")
    cfg["model"] = {"name_or_path": str(model_dir)}
    cfg["data"]["max_seq_length"] = 128
    return config_from_dict(cfg)


def _records(stage: Path) -> list[dict]:
    return [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def _tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    wmap = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, shard in wmap.items():
        if name.startswith(prefix):
            with safe_open(str(folder / shard), framework="pt") as f:
                out[name] = f.get_tensor(name)
    return out


KW = dict(mtp_loss_weight=0.3, max_steps=6, save_steps=2, per_device_train_batch_size=2,
          gradient_accumulation_steps=1, learning_rate=5e-3, lr_scheduler="constant", warmup_steps=0)


@pytest.mark.slow  # ≈ 100 s on 2 shared cores: three short trainings and an export
def test_mtp_loss_falls_resumes_bit_exact_and_exports_the_touched_mtp_tensors(tmp_path, fp8_dir):
    recs = medical_records(1, with_label_task=False) * 2  # the same batch every step
    ref = make_run(tmp_path / "ref", recs)
    m = train(_cfg(tmp_path / "ref", fp8_dir, **KW), ref, progress=False)
    log = _records(tmp_path / "ref/train")
    mtp = [r["mtp_loss"] for r in log]
    assert len(mtp) == 6 and mtp[-1] < mtp[0] - 0.3, mtp
    assert all(r["mtp_labels"] > 0 for r in log) and log[-1]["loss"] < log[0]["loss"]
    by_kind = m["method_info"]["targets"]["by_kind"]
    assert by_kind["mtp"] == 1 and by_kind["routed_experts"] == 3 * 4 * 3  # 2 MoE layers + the MTP block's
    adapter = load_file(str(tmp_path / "ref/train/adapter/adapter_model.safetensors"))
    mtp_keys = [k for k in adapter if f".{MTP}" in k]
    assert any(f"{MTP}eh_proj.lora_B" in k for k in mtp_keys)
    assert any(f"{MTP}self_attn.kv_b_proj.lora_A" in k for k in mtp_keys)
    assert any(f"{MTP}mlp.experts.2.down_proj.lora_B" in k for k in mtp_keys)

    # kill at step 5 and resume: the same losses (LM and MTP) and the same adapter, bit for bit
    k = make_run(tmp_path / "k", recs)
    cfg_k = _cfg(tmp_path / "k", fp8_dir, **KW)
    with pytest.raises(Crash):
        train(cfg_k, k, fault_hook=crash_at(5), progress=False)
    train(cfg_k, k, resume="auto", progress=False)
    assert [(r["loss"], r["mtp_loss"]) for r in _records(tmp_path / "k/train")] == [(r["loss"], r["mtp_loss"]) for r in log]
    a = load_file(str(tmp_path / "k/train/adapter/adapter_model.safetensors"))
    assert a.keys() == adapter.keys() and all(torch.equal(a[n], adapter[n]) for n in a)

    # the export merges the MTP LoRA into the MTP tensors (FP8 re-quantized); the rest of the MTP layer is bitwise
    out = tmp_path / "merged"
    stream_merge(fp8_dir, out, adapter_dir=tmp_path / "ref/train/adapter", out_format="fp8")
    before, after = _tensors(fp8_dir, MTP), _tensors(out, MTP)
    assert before.keys() == after.keys()
    touched = {k.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0] for k in mtp_keys}
    want = {f"{t}.weight" for t in touched} | {f"{t}.weight_scale_inv" for t in touched}
    changed = {n for n in before if not torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8))}
    assert changed and changed <= want and {n for n in want if n.endswith(".weight")} <= changed
    assert after[f"{MTP}eh_proj.weight"].dtype == torch.float8_e4m3fn
    for n in (f"{MTP}embed_tokens.weight", f"{MTP}shared_head.head.weight", f"{MTP}enorm.weight"):
        assert torch.equal(before[n], after[n])


def test_mtp_loss_weight_needs_an_fp8_folder_with_mtp(tmp_path):
    run = make_run(tmp_path, medical_records(1, with_label_task=False))
    folder = write_shipped(tmp_path / "nomtp", mtp=False)
    with pytest.raises(TrainError, match=r"train.mtp_loss_weight 0.2: .* not a shipped FP8 DeepSeek-V3 folder with "
                                         r"an MTP layer"):
        train(_cfg(tmp_path, folder, mtp_loss_weight=0.2, max_steps=1), run, progress=False)
