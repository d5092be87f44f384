"""Two processes on CPU (gloo) through `dsft train --nproc 2` (accelerate): same loss curve as one process at the
same global batch, and a 2-process checkpoint resumes in one process."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from dist_helpers import losses, train_two
from safetensors.torch import load_file
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.train import train
from dsft.train.dist import accelerate_config, deepspeed_config

pytestmark = pytest.mark.slow


def _cfg(root, **kw):
    c = tiny_cfg(root, **{"max_steps": 6, "save_steps": 3, "per_device_train_batch_size": 2, **kw}).model_dump(mode="json")
    c["lora"]["dropout"] = 0.0
    return c


def test_ddp_two_processes_match_one_and_resume_in_one(tmp_path, records16):
    make_run(tmp_path / "ddp", records16)
    train_two(tmp_path / "ddp.yaml", _cfg(tmp_path / "ddp"))
    m2 = json.loads((tmp_path / "ddp/train/manifest.json").read_text())
    assert m2["processes"] == {"world": 2, "kind": "MULTI_CPU"} and m2["effective_batch"] == 4
    assert (tmp_path / "ddp/accelerate_multi_gpu.yaml").exists()

    one = make_run(tmp_path / "one", records16)
    train(config_from_dict(_cfg(tmp_path / "one", gradient_accumulation_steps=2)), one)
    l2, l1 = losses(tmp_path / "ddp/train"), losses(tmp_path / "one/train")
    assert l2.keys() == l1.keys() == set(range(1, 7))
    assert max(abs(l2[k] - l1[k]) for k in l1) < 1e-4

    res = make_run(tmp_path / "res", records16)
    m = train(config_from_dict(_cfg(tmp_path / "res", gradient_accumulation_steps=2)), res,
              resume=str(tmp_path / "ddp/train/checkpoints/checkpoint-3"))
    assert m["steps"] == 6
    lr = losses(tmp_path / "res/train")
    assert set(lr) == {4, 5, 6} and max(abs(lr[k] - l2[k]) for k in lr) < 1e-4


def test_generated_fsdp_and_deepspeed_configs():
    tc = config_from_dict({"train": {"strategy": "deepspeed", "zero_stage": 3, "offload": True, "nproc": 8,
                                     "num_machines": 2, "main_process_ip": "10.0.0.1"}}).train
    ds = accelerate_config(tc, n_gpu=8, mixed_precision="bf16")
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_processes"] == 16 and ds["main_process_ip"] == "10.0.0.1"
    assert ds["deepspeed_config"]["zero_stage"] == 3 and ds["deepspeed_config"]["offload_param_device"] == "cpu"
    # the worker's deepspeed.initialize config says the same: stage, offload, clipping; the loop owns accumulation
    w = deepspeed_config(tc, micro=2, accum=4, world=16, zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    assert w["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert w["gradient_clipping"] == ds["deepspeed_config"]["gradient_clipping"] == tc.max_grad_norm
    assert w["managed_gradient_accumulation"] is False and w["train_batch_size"] == 2 * 4 * 16
    assert not ds["deepspeed_config"]["zero3_init_flag"]  # the worker loads the full model and the engine partitions it
    cpu = accelerate_config(tc, n_gpu=0)["deepspeed_config"]  # on CPU the state already lives in host memory
    assert cpu["offload_optimizer_device"] == cpu["offload_param_device"] == "none"
    tc = config_from_dict({"train": {"strategy": "fsdp", "nproc": 4}}).train
    fs = accelerate_config(tc, n_gpu=4, layer_cls="DeepseekV3DecoderLayer")
    assert fs["distributed_type"] == "FSDP"
    assert fs["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "DeepseekV3DecoderLayer"


def test_fsdp_two_processes_shard_on_cpu_match_one_and_resume_in_one(tmp_path, records16):
    """Real FSDP2 (fully_shard over gloo) on CPU: 1-process loss curve, and its checkpoint resumes in 1 process."""
    c = _cfg(tmp_path / "fsdp", max_steps=4, save_steps=2)
    c["train"]["strategy"] = "fsdp"
    make_run(tmp_path / "fsdp", records16)
    out = train_two(tmp_path / "fsdp.yaml", c)
    assert "plain data parallel" not in out.stdout + out.stderr
    m2 = json.loads((tmp_path / "fsdp/train/manifest.json").read_text())
    assert m2["processes"]["world"] == 2 and m2["processes"]["kind"] == "FSDP" and m2["effective_batch"] == 4
    assert 0.4 < m2["processes"]["local_param_fraction"] < 0.6  # each rank really holds half the weights
    assert (tmp_path / "fsdp/train/adapter/adapter_model.safetensors").exists()

    one = make_run(tmp_path / "one", records16)
    train(config_from_dict(_cfg(tmp_path / "one", max_steps=4, save_steps=2, gradient_accumulation_steps=2)), one)
    l2, l1 = losses(tmp_path / "fsdp/train"), losses(tmp_path / "one/train")
    assert l2.keys() == l1.keys() == set(range(1, 5))
    assert max(abs(l2[k] - l1[k]) for k in l1) < 1e-4
    a2 = load_file(str(tmp_path / "fsdp/train/adapter/adapter_model.safetensors"))  # gathered, not one shard
    a1 = load_file(str(tmp_path / "one/train/adapter/adapter_model.safetensors"))
    assert a2.keys() == a1.keys() and all(a2[k].shape == a1[k].shape for k in a1)
    assert max(float((a2[k] - a1[k]).abs().max()) for k in a1) < 1e-4

    res = make_run(tmp_path / "res", records16)
    m = train(config_from_dict(_cfg(tmp_path / "res", max_steps=4, save_steps=2, gradient_accumulation_steps=2)),
              res, resume=str(tmp_path / "fsdp/train/checkpoints/checkpoint-2"))
    assert m["steps"] == 4
    lr = losses(tmp_path / "res/train")
    assert set(lr) == {3, 4} and max(abs(lr[k] - l2[k]) for k in lr) < 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_on_cpu_match_one_and_resume_in_one(tmp_path, records16, stage):
    """Real DeepSpeed ZeRO-2/3 (deepspeed.initialize, CPU accelerator, gloo): the 1-process loss curve at the same
    global batch (engine-side clipping and LR per step included), gathered adapter = the 1-process adapter, and its
    checkpoint (gathered fp32 weights + AdamW moments) resumes in 1 process on the same curve."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'dsft[deepspeed]')")
    name = f"zero{stage}"
    c = _cfg(tmp_path / name, max_steps=4, save_steps=2)
    c["train"].update(strategy="deepspeed", zero_stage=stage)
    make_run(tmp_path / name, records16)
    cfg_path = tmp_path / f"{name}.yaml"
    out = train_two(cfg_path, c)
    assert "plain data parallel" not in out.stdout + out.stderr
    assert f"DeepSpeed ZeRO-{stage} on cpu (gloo)" in out.stdout and f"2 processes (DeepSpeed ZeRO-{stage})" in out.stdout
    m2 = json.loads((tmp_path / f"{name}/train/manifest.json").read_text())
    p = m2["processes"]
    assert p["world"] == 2 and p["kind"] == "DEEPSPEED" and p["zero_stage"] == stage and m2["effective_batch"] == 4
    assert 0.4 < p["local_optim_fraction"] < 0.6  # each rank's AdamW state is half of it (ZeRO partitions)
    if stage == 3:
        assert 0.4 < p["local_param_fraction"] < 0.6  # ...and under ZeRO-3 half the weights too
    acfg = yaml.safe_load((tmp_path / f"{name}/accelerate_deepspeed.yaml").read_text())
    assert acfg["deepspeed_config"]["zero_stage"] == stage

    one = make_run(tmp_path / "one", records16)
    train(config_from_dict(_cfg(tmp_path / "one", max_steps=4, save_steps=2, gradient_accumulation_steps=2)), one)
    l2, l1 = losses(tmp_path / f"{name}/train"), losses(tmp_path / "one/train")
    assert l2.keys() == l1.keys() == set(range(1, 5))
    assert max(abs(l2[k] - l1[k]) for k in l1) < 1e-4
    g1 = {r["step"]: r["grad_norm"] for r in map(json.loads, (tmp_path / "one/train/log.jsonl").read_text().splitlines())
          if "grad_norm" in r}
    g2 = {r["step"]: r["grad_norm"] for r in map(json.loads, (tmp_path / f"{name}/train/log.jsonl").read_text().splitlines())
          if "grad_norm" in r}
    assert g1.keys() == g2.keys() and max(abs(g2[k] - g1[k]) / g1[k] for k in g1) < 1e-3
    a2 = load_file(str(tmp_path / f"{name}/train/adapter/adapter_model.safetensors"))  # gathered, not a partition
    a1 = load_file(str(tmp_path / "one/train/adapter/adapter_model.safetensors"))
    assert a2.keys() == a1.keys() and all(a2[k].shape == a1[k].shape for k in a1)
    # AdamW turns float-rounding differences of near-zero gradients into visible updates in a few elements: an element
    # whose gradient is ~0 can take AdamW's ±lr step either way, so one element may differ by about lr (2e-3) per
    # step (ZeRO-3 on DeepSpeed 0.19.8: 2.46e-3 in one element after 4 steps). A wrong gather moves whole tensors,
    # which the mean check below catches (it stays under 2e-6); the max only bounds a single flipped element.
    assert max(float((a2[k] - a1[k]).abs().max()) for k in a1) < 2 * 2e-3 + 1e-3
    assert max(float((a2[k] - a1[k]).abs().mean()) for k in a1) < 2e-6
    ck2 = load_file(str(tmp_path / f"{name}/train/checkpoints/checkpoint-2/optimizer.safetensors"))
    assert ck2 and any(k.endswith(".exp_avg_sq") for k in ck2)

    res = make_run(tmp_path / "res", records16)
    m = train(config_from_dict(_cfg(tmp_path / "res", max_steps=4, save_steps=2, gradient_accumulation_steps=2)),
              res, resume=str(tmp_path / f"{name}/train/checkpoints/checkpoint-2"))
    assert m["steps"] == 4
    lr = losses(tmp_path / "res/train")
    assert set(lr) == {3, 4} and max(abs(lr[k] - l2[k]) for k in lr) < 1e-4

    # an interrupted 2-process run (only checkpoint-2 on disk) continues under DeepSpeed with --resume auto: weights
    # go in before deepspeed.initialize, the AdamW moments into the ZeRO partitions after it — the same curve (without
    # the moments step 4 is off by ~1e-2)
    c["run_dir"] = str(tmp_path / "cont")
    make_run(tmp_path / "cont", records16)
    shutil.copytree(tmp_path / f"{name}/train/checkpoints/checkpoint-2", tmp_path / "cont/train/checkpoints/checkpoint-2")
    train_two(cfg_path, c, "--resume", "auto")
    lc = losses(tmp_path / "cont/train")
    assert set(lc) == {3, 4} and max(abs(lc[k] - l2[k]) for k in lc) < 1e-6
