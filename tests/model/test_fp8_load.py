"""Loading a shipped FP8 DeepSeek-V3 folder: e4m3 kept in memory, logits equal a plain-torch FP32 reference, MTP aside."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsft.errors import ModelError
from dsft.model.base_checkpoint import describe, read_base_checkpoint
from dsft.model.fp8_linear import FP8Linear, fp8_modules, fp8_resident_bytes
from dsft.model.load import load_model
from dsft.model.shipped import write_shipped

IDS = torch.tensor([[0, 100, 2000, 30000, 5, 77, 900, 12, 128000, 4], [0, 9, 8, 7, 6, 5, 4, 3, 2, 1]])


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return write_shipped(tmp_path_factory.mktemp("fp8") / "v3")


@pytest.fixture(scope="module")
def fp8_model(fp8_dir):
    return load_model(fp8_dir, dtype="float32")


def reference_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint dequantized to FP32 and fused the way transformers names it — plain torch, no dsft code."""
    wmap = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for shard in sorted(set(wmap.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.layers.3.")})
    out = {}
    for k, t in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = raw[k + "_scale_inv"]
            rows, cols = t.shape
            s = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            t = t.float() * s
        out[k] = t.float()
    experts: dict[str, dict] = {}
    for k in [k for k in out if re.search(r"\.experts\.\d+\.", k)]:
        pre, e, proj = re.match(r"(.*\.experts)\.(\d+)\.(\w+)_proj\.weight", k).groups()
        experts.setdefault(pre, {})[(int(e), proj)] = out.pop(k)
    for pre, p in experts.items():
        n = 1 + max(e for e, _ in p)
        out[pre + ".gate_up_proj"] = torch.stack([torch.cat([p[(e, "gate")], p[(e, "up")]]) for e in range(n)])
        out[pre + ".down_proj"] = torch.stack([p[(e, "down")] for e in range(n)])
    return out


def test_logits_equal_a_plain_torch_fp32_dequantization(fp8_dir, fp8_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(fp8_dir))
    del cfg.quantization_config
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(reference_state(fp8_dir), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ref.eval()
    with torch.no_grad():
        want, got = ref(IDS).logits, fp8_model(IDS).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_base_stays_fp8_about_one_byte_per_parameter(fp8_dir, fp8_model):
    held, params = fp8_resident_bytes(fp8_model)
    assert params > 2_000_000 and held / params < 1.01  # 1 byte/param + one float32 scale per 128×128 block
    names = [n for n, _ in fp8_modules(fp8_model)]
    assert "model.layers.1.mlp.experts.3.down_proj" in names and "model.layers.0.self_attn.q_b_proj" in names
    # no float copy of any FP8 weight anywhere in the model: the other tensors are exactly the unquantized ones
    from dsft.model.info import read_safetensors_header

    wmap = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    unquantized = 0
    for shard in set(wmap.values()):
        for k, e in read_safetensors_header(fp8_dir / shard).items():
            if e["dtype"] != "F8_E4M3" and not k.endswith("_scale_inv") and not k.startswith("model.layers.3."):
                unquantized += 4 * torch.Size(e["shape"]).numel()  # loaded as float32
    other = sum(t.nbytes for n, t in [*fp8_model.named_parameters(), *fp8_model.named_buffers()]
                if t.dtype != torch.float8_e4m3fn and not n.endswith("weight_scale_inv") and "rotary" not in n)
    assert other == unquantized


def test_backward_recomputes_the_dequantized_weight_instead_of_saving_it(fp8_model):
    lin: FP8Linear = fp8_model.model.layers[1].mlp.experts[0].down_proj
    x = torch.randn(5, lin.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert all(t.dtype == torch.float8_e4m3fn or t.numel() < lin.in_features for t in saved), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    y.square().sum().backward()
    w = lin.weight.detach()  # the dequantized weight, for the reference only
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert lin.weight_fp8.grad is None


def test_mtp_layer_is_kept_aside_and_described(fp8_dir, fp8_model):
    assert len(fp8_model.model.layers) == 3
    assert not any(".layers.3." in n for n, _ in fp8_model.named_parameters())
    info = read_base_checkpoint(fp8_dir)
    assert info["format"] == "fp8" and info["block"] == [128, 128] and info["shards"] == 3
    assert info["mtp_layers"] == [3] and info["mtp_prefixes"] == ["model.layers.3."]
    assert info["mtp_shards"] == ["model-00003-of-00003.safetensors"] and info["mtp_tensors"] > 20
    assert describe(info) == "FP8 e4m3 base, 128×128 blocks, 1 MTP layer kept, 3 shards"


def test_dtype_casts_keep_the_fp8_format(fp8_model):
    import copy

    lin = copy.deepcopy(fp8_model.model.layers[0].mlp.gate_proj)
    lin.to(torch.bfloat16)
    assert lin.weight_fp8.dtype == torch.float8_e4m3fn and lin.weight_scale_inv.dtype == torch.float32
    assert lin.weight.dtype == torch.bfloat16 and lin(torch.randn(2, lin.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_sharded_with_mtp_loads_with_mtp_aside_and_matches_fp8(fp8_model, tmp_path, capfd):
    d = write_shipped(tmp_path / "bf16", variant="bf16")
    model = load_model(d, dtype="float32")
    assert "UNEXPECTED" not in capfd.readouterr().out  # this folder's MTP layer is ignored on purpose
    assert len(model.model.layers) == 3 and not any(isinstance(m, FP8Linear) for m in model.modules())
    assert describe(read_base_checkpoint(d)) == "BF16 base, 1 MTP layer kept, 3 shards"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, fp8_model(IDS).logits, atol=0.05, rtol=0)  # bf16 rounding


def test_lora_and_dora_attach_to_every_fp8_linear_including_each_routed_expert(fp8_model):
    import copy

    from dsft.config import LoraConfig
    from dsft.model.adapters import attach_lora, merge_adapter

    for dora in (False, True):
        pm, targets = attach_lora(copy.deepcopy(fp8_model), LoraConfig(r=4, dropout=0.0), use_dora=dora)
        assert "model.layers.2.mlp.experts.3.up_proj" in targets.modules and not targets.parameters
        assert targets.summary()["by_kind"]["routed_experts"] == 2 * 4 * 3
        assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "lora_" in n)
        with torch.no_grad():
            torch.testing.assert_close(pm(IDS).logits, fp8_model(IDS).logits)  # B = 0: the base's logits
        with pytest.raises(ModelError, match="FP8"):
            merge_adapter(pm)


def test_broken_fp8_folders_fail_in_one_line(fp8_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(fp8_dir, d)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00003.safetensors"):
        load_model(d, dtype="float32")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["moe_intermediate_size"] = 128
    shutil.copyfile(fp8_dir / "model-00002-of-00003.safetensors", d / "model-00002-of-00003.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"experts\.0\.(gate|up|down)_proj\.weight: .*expected \((128, 256|256, 128)\)"):
        load_model(d, dtype="float32")


def test_dora_with_dropout_keeps_no_dequantized_weight_and_equals_peft(fp8_model):
    """PEFT's DoRA with dropout recomputes the base term as F.linear(x, dequant(W)) and autograd keeps that dense W
    for backward — per adapted module, the full-precision copy an FP8 base avoids. dsft routes the term through the
    FP8 module: no saved tensor has an FP8 weight's shape, and loss and gradients equal PEFT's own path."""
    import copy

    from dsft.config import LoraConfig
    from dsft.model.adapters import attach_lora
    from dsft.model.fp8_dora import FP8DoraLinearLayer

    shapes = {tuple(m.weight_fp8.shape) for _, m in fp8_modules(fp8_model)}

    def run(switch_back: bool):
        torch.manual_seed(0)
        pm, _ = attach_lora(copy.deepcopy(fp8_model), LoraConfig(r=4, dropout=0.1), use_dora=True)
        mags = [m for m in pm.modules() if isinstance(m, FP8DoraLinearLayer)]
        assert len(mags) == len(fp8_modules(fp8_model))  # every FP8 module's DoRA layer is switched
        if switch_back:  # PEFT's own DoRA layer (the reference)
            from peft.tuners.lora.dora import DoraLinearLayer

            for m in mags:
                m.__class__ = DoraLinearLayer
        for n, p in pm.named_parameters():  # a non-zero B, so the LoRA term and its gradients are not trivial
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        pm.train()
        saved: list[tuple[tuple[int, ...], torch.dtype]] = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pm(IDS, labels=IDS)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        dense = [s for s, dt in saved if s in shapes and dt.is_floating_point and dt != torch.float8_e4m3fn]
        return out.loss.detach(), grads, dense

    loss, grads, dense = run(False)
    ref_loss, ref_grads, ref_dense = run(True)
    assert not dense, f"{len(dense)} dequantized weights kept for backward, e.g. {dense[0]}"
    assert ref_dense, "the reference (PEFT's DoRA with dropout) keeps dense weights: the check can fail"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("lora_magnitude" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
