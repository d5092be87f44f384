"""ESFT: expert scores against hand-computed references, top_p selection, training that changes only the selected
experts (bitwise, V2- and V3-shape), bit-exact resume, and the config rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from esft_helpers import build_moe
from safetensors.torch import load_file
from train_helpers import Crash, crash_at, make_run

from dsft.config import config_from_dict, resolve_config
from dsft.errors import ConfigError, TrainError
from dsft.model.info import read_model_info
from dsft.model.load import load_model
from dsft.run import RunDir
from dsft.train import train
from dsft.train.esft import moe_layers
from dsft.train.esft_profile import profile_experts, routing_entropy, sample_examples
from dsft.train.esft_select import select_experts, select_top_p


def esft_cfg(root: Path, model: Path, esft: dict | None = None, **train_kw):
    return config_from_dict({
        "run_dir": str(root), "model": {"name_or_path": str(model)}, "data": {"max_seq_length": 160},
        "train": {"method": "esft", "max_steps": 3, "logging_steps": 1, "save_steps": 1000, "report_to": ["none"],
                  "per_device_train_batch_size": 2, **train_kw},
        "esft": {"sample_tokens": 1500, **(esft or {})}})


def run_esft(root: Path, model: Path, records, esft: dict | None = None, **kw) -> dict:
    make_run(root, records)
    return train(esft_cfg(root, model, esft, **kw), RunDir(root), progress=False)


# ---------------------------------------------------------------- profile
def test_scores_equal_hand_computed_values_under_forced_routing(tmp_path):
    """V3 router with zero weights: every expert scores sigmoid(0) = 0.5 and the correction bias alone picks the top-2,
    so each layer's routing is known by hand: 2 experts, half the slots each, gate 0.5 each (scale removed)."""
    model = load_model(build_moe(tmp_path / "m", "deepseek_v3", norm_topk_prob=False, routed_scaling_factor=2.5),
                       dtype="float32")
    forced = {1: (1, 2), 2: (7, 0)}
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.mlp.gate.weight.zero_()
            bias = torch.zeros(layer.n_experts)
            bias[list(forced[layer.index])] = torch.tensor([0.4, 0.3])
            layer.mlp.gate.e_score_correction_bias.copy_(bias)
    lists = [list(range(10, 10 + n)) for n in (5, 9, 3, 7)]  # different lengths: padded batches
    scores = profile_experts(model, lists, sample_tokens=20, seed=3, pad_id=2)
    assert scores["tokens"] == 20  # the budget, the last example cut to fit
    for li, experts in forced.items():
        s = scores["layers"][str(li)]
        expect = [0.5 if e in experts else 0.0 for e in range(8)]
        assert s["token"] == expect and s["gate"] == expect
        assert s["gate_mean"] == expect  # Σ g / N with N = real tokens only: padding would push it above 0.5
        assert s["routing_entropy"] == pytest.approx(routing_entropy(expect)) and 0 < s["routing_entropy"] < 0.34


def test_v2_scores_equal_a_reference_from_the_router_inputs(tmp_path):
    """V2 (softmax, greedy top-2): recompute by hand from the hidden states each router receives."""
    model = load_model(build_moe(tmp_path / "m", "deepseek_v2"), dtype="float32")
    layers = moe_layers(model)
    seen: dict[int, list[torch.Tensor]] = {la.index: [] for la in layers}
    hooks = [la.mlp.gate.register_forward_pre_hook(lambda _m, inp, i=la.index: seen[i].append(inp[0].detach()))
             for la in layers]
    lists = [[(7 * i + 3 * j) % 7000 + 100 for j in range(11 + i)] for i in range(6)]
    sample = sample_examples(lists, 10_000, seed=1)
    scores = profile_experts(model, lists, sample_tokens=10_000, seed=1)
    for h in hooks:
        h.remove()
    real = torch.cat([torch.ones(len(x), dtype=torch.bool) for x in sample])
    for la in layers:
        width = [max(len(x) for x in sample[b:b + 8]) for b in range(0, len(sample), 8)]
        keep = torch.cat([torch.cat([torch.arange(w) < len(x) for x in sample[b * 8:(b + 1) * 8]])
                          for b, w in enumerate(width)])
        hid = torch.cat([h.reshape(-1, h.shape[-1]) for h in seen[la.index]])[keep]
        probs = F.linear(hid.float(), la.mlp.gate.weight.float()).softmax(-1)
        w, idx = probs.topk(2, dim=-1)
        n = real.sum().item()
        token = torch.bincount(idx.reshape(-1), minlength=8).double() / (2 * n)
        gate_sum = torch.bincount(idx.reshape(-1), weights=w.reshape(-1).double(), minlength=8)
        s = scores["layers"][str(la.index)]
        assert s["token"] == pytest.approx(token.tolist(), abs=1e-12)
        assert s["gate_mean"] == pytest.approx((gate_sum / n).tolist(), abs=1e-6)
        assert s["gate"] == pytest.approx((gate_sum / gate_sum.sum()).tolist(), abs=1e-6)
        assert s["gate"] != s["token"]


# ---------------------------------------------------------------- select
def test_top_p_selection_on_known_scores():
    shares = [0.125, 0.5, 0.0, 0.25, 0.125, 0.0, 0.0, 0.0]
    assert select_top_p(shares, 0.2) == [1]
    assert select_top_p(shares, 0.5) == [1]  # reached exactly: stop
    assert select_top_p(shares, 0.6) == [1, 3]
    assert select_top_p(shares, 0.8) == [0, 1, 3]  # tie 0.125/0.125: the lower id first
    assert select_top_p(shares, 1.0) == [0, 1, 3, 4]  # never an expert nobody routes to
    assert select_top_p([0.25] * 4, 0.3) == [0, 1]
    profile = {"layers": {"1": {"token": shares, "gate": [0.0, 0.05, 0.0, 0.05, 0.9, 0, 0, 0]},
                          "2": {"token": [1.0] + [0.0] * 7, "gate": [0.6, 0.4] + [0.0] * 6}}}
    assert select_experts(profile, "token", 0.2) == {1: [1], 2: [0]}
    assert select_experts(profile, "gate", 0.1) == {1: [4], 2: [0]}
    assert select_experts(profile, "gate", 0.7) == {1: [4], 2: [0, 1]}


def test_top_p_defaults_and_esft_keys_need_method_esft():
    assert config_from_dict({"train": {"method": "esft"}}).esft.top_p == 0.2
    assert config_from_dict({"train": {"method": "esft"}, "esft": {"score": "gate"}}).esft.top_p == 0.1
    cfg = config_from_dict({"esft": {"top_p": 0.3}})
    with pytest.raises(ConfigError, match="esft.top_p has no effect with train.method lora"):
        resolve_config(cfg, read_model_info(cfg.model.name_or_path))
    cfg = config_from_dict({"train": {"method": "esft"}, "lora": {"r": 4}})
    with pytest.raises(ConfigError, match="lora.r has no effect with train.method esft"):
        resolve_config(cfg, read_model_info(cfg.model.name_or_path))
    out = resolve_config(config_from_dict({"train": {"method": "esft"}}), read_model_info("embedded:tiny-deepseek-v3"))
    assert out.train.adam_beta2 == 0.95 and resolve_config(out, read_model_info(out.model.name_or_path)) == out


# ---------------------------------------------------------------- train: only the selected experts change
@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def esft_run(request, tmp_path_factory, records16):
    root = tmp_path_factory.mktemp(request.param)
    base = build_moe(root / "base", request.param)
    manifest = run_esft(root / "run", base, records16)
    return {"kind": request.param, "base": base, "run": root / "run", "manifest": manifest}


def _changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_only_the_selected_experts_change_bitwise(esft_run):
    run, m = esft_run["run"], esft_run["manifest"]
    scores = json.loads((run / "esft" / "expert_scores.json").read_text())
    chosen = {int(k): v for k, v in scores["selection"]["experts"].items()}
    assert chosen == select_experts(scores, "token", 0.2) and {int(k): v for k, v in
                                                                m["method_info"]["experts"].items()} == chosen
    assert (run / "esft" / "expert_scores.png").stat().st_size > 1000
    base = load_file(str(esft_run["base"] / "model.safetensors"))
    trained = load_file(str(run / "train" / "model" / "model.safetensors"))
    expect = {f"model.layers.{li}.mlp.experts.{e}.{p}_proj.weight" for li, es in chosen.items() for e in es
              for p in ("gate", "up", "down")}
    assert _changed(base, trained) == expect  # every other tensor (router, attention, embeddings …) bitwise equal
    delta = json.loads((run / "train" / "esft" / "esft_delta.json").read_text())
    assert set(delta["tensors"]) == expect
    per_expert = sum(base[k].numel() for k in expect)
    assert m["trainable_params"] == per_expert == delta["trainable_params"]
    assert m["trainable_params"] < 0.25 * sum(t.numel() for k, t in base.items() if ".mlp.experts." in k)


def test_shared_experts_ablation_trains_them_too(tmp_path, records16):
    base = build_moe(tmp_path / "base", "deepseek_v3")
    run_esft(tmp_path / "run", base, records16, esft={"experts": {1: [3], 2: [0, 5]}, "train_shared_experts": True},
             max_steps=2)
    changed = _changed(load_file(str(base / "model.safetensors")),
                       load_file(str(tmp_path / "run/train/model/model.safetensors")))
    routed = {f"model.layers.{li}.mlp.experts.{e}.{p}_proj.weight" for li, es in {1: [3], 2: [0, 5]}.items()
              for e in es for p in ("gate", "up", "down")}
    shared = {f"model.layers.{li}.mlp.shared_experts.{p}_proj.weight" for li in (1, 2) for p in ("gate", "up", "down")}
    assert changed == routed | shared
    assert json.loads((tmp_path / "run/esft/expert_config.json").read_text())["experts"] == {"1": [3], "2": [0, 5]}


def test_non_expert_ablation_on_a_bf16_model_keeps_the_router_frozen_in_fp32(tmp_path):
    """esft.train_non_expert_modules: attention, dense MLP, norms, embeddings and LM head train too; the router,
    the fused experts and the shared experts do not, the router is fp32 in a bf16 model, and the printed
    trainable-parameter count (esft_select.trainable_params) is what trains."""
    from dsft.train.esft import selection_from_config
    from dsft.train.esft_select import trainable_params
    from dsft.train.setup import apply_method, count_params, hyperparameters, is_router

    base = build_moe(tmp_path / "m", "deepseek_v2")
    cfg = config_from_dict({"train": {"method": "esft"},
                            "esft": {"experts": {1: [2], 2: [4, 6]}, "train_non_expert_modules": True}})
    model = load_model(base, dtype="bfloat16")
    names = {n for n, _ in model.named_parameters()}
    sel = selection_from_config(cfg.esft)
    predicted = trainable_params(moe_layers(model), sel, model)
    model, info = apply_method(model, cfg, hyperparameters(cfg, count_params(model)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expect = {n for n in names if not (is_router(n) or ".mlp.experts." in n or ".shared_experts." in n)}
    expect |= {f"model.layers.{i}.mlp.experts.esft_{w}_proj" for i in (1, 2) for w in ("gate_up", "down")}
    assert trainable == expect
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.self_attn.kv_b_proj.weight", "model.norm.weight"} <= trainable
    assert info["trainable_params"] == predicted == sum(p.numel() for p in model.parameters() if p.requires_grad)
    routers = [p for n, p in model.named_parameters() if is_router(n)]
    assert routers and all(p.dtype == torch.float32 and not p.requires_grad for p in routers)
    ids = torch.tensor([[5, 17, 300, 41, 2048, 9, 77, 1000]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in routers)
    assert model.model.layers[1].mlp.experts.esft_gate_up_proj.grad.abs().sum() > 0


def test_training_starts_from_the_base_outputs(tmp_path):
    """Split out, the model computes what the base computes (frozen experts through transformers' kernel)."""
    from dsft.train.esft import Selection, apply_esft, merge_back

    base = build_moe(tmp_path / "m", "deepseek_v3")
    ref, model = load_model(base, dtype="float32"), load_model(base, dtype="float32")
    ids = torch.tensor([[5, 17, 300, 41, 2048, 9, 77, 1000]])
    apply_esft(model, Selection(experts={1: [0, 1, 2, 3, 4, 5, 6, 7], 2: [2]}))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.experts.esft_{w}_proj" for i in (1, 2) for w in ("gate_up", "down")}
    merge_back(model)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in ref.named_parameters()}
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_esft_refuses_a_dense_model_and_a_missing_expert(tmp_path, records16):
    from dsft.train.esft import Selection, apply_esft

    base = build_moe(tmp_path / "m", "deepseek_v3")
    with pytest.raises(TrainError, match="layer 1: expert 8 does not exist"):
        apply_esft(load_model(base, dtype="float32"), Selection(experts={1: [8]}))
    with pytest.raises(TrainError, match="layer 0 is not a MoE layer"):
        apply_esft(load_model(base, dtype="float32"), Selection(experts={0: [1]}))
    import transformers as tf

    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TrainError, match="model_type 'llama' has no routed experts"):
        apply_esft(dense, Selection(experts={0: [0]}))


# ---------------------------------------------------------------- resume
def test_resume_after_a_crash_is_bit_exact(tmp_path, records16):
    base = build_moe(tmp_path / "base", "deepseek_v3")
    kw = dict(max_steps=6, save_steps=2, gradient_accumulation_steps=2)
    ref = run_esft(tmp_path / "ref", base, records16, **kw)
    make_run(tmp_path / "k", records16)
    cfg = esft_cfg(tmp_path / "k", base, **kw)
    with pytest.raises(Crash):
        train(cfg, RunDir(tmp_path / "k"), fault_hook=crash_at(5), progress=False)
    assert (tmp_path / "k/train/checkpoints/checkpoint-4").is_dir()
    got = train(cfg, RunDir(tmp_path / "k"), resume="auto", progress=False)
    assert got["loss_last_step"] == ref["loss_last_step"]
    a = load_file(str(tmp_path / "ref/train/esft/esft_delta.safetensors"))
    b = load_file(str(tmp_path / "k/train/esft/esft_delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_file(str(tmp_path / "k/train/checkpoints/checkpoint-4/trainable.safetensors"))
    assert all(".esft_" in k for k in ckpt)  # the checkpoint holds the selected experts only


def test_the_oom_ladder_halves_then_checkpoints_and_trains_the_same_experts(tmp_path, records16):
    """Injected OOMs: micro-batch 2 → 1 (same effective batch), then gradient checkpointing over the split-out
    experts' forward; the delta matches a run at micro-batch 1 without OOM (up to float summation order)."""
    base = build_moe(tmp_path / "base", "deepseek_v2")
    esft = {"experts": {1: [0, 3], 2: [5]}}
    run_esft(tmp_path / "ref", base, records16, esft=esft, max_steps=4, per_device_train_batch_size=1,
             gradient_accumulation_steps=2)
    fired: list[int] = []

    def oom(step, micro):
        if step == 2 and micro > 1:
            raise torch.OutOfMemoryError("injected")
        if step == 3 and not fired:
            fired.append(step)
            raise torch.OutOfMemoryError("injected")

    make_run(tmp_path / "oom", records16)
    m = train(esft_cfg(tmp_path / "oom", base, esft, max_steps=4), RunDir(tmp_path / "oom"), fault_hook=oom,
              progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "oom/train/log.jsonl").read_text().splitlines()]
    actions = [r["action"] for r in log if r.get("event") == "oom"]
    assert len(actions) == 2 and actions[0].startswith("micro-batch halved to 1") and \
        actions[1] == "gradient checkpointing enabled"
    assert m["micro_batch"] == 1 and m["effective_batch"] == 2 and m["steps"] == 4
    a = load_file(str(tmp_path / "oom/train/esft/esft_delta.safetensors"))
    b = load_file(str(tmp_path / "ref/train/esft/esft_delta.safetensors"))
    assert a.keys() == b.keys() and len(a) == 9
    diff = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    moved = sum(float((b[k] - load_file(str(base / "model.safetensors"))[k]).double().norm() ** 2) for k in b) ** 0.5
    assert moved > 0 and diff < 1e-3 * moved


def test_the_v2_lite_example_is_an_esft_config():
    from dsft.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "esft_deepseek_v2_lite.yaml")
    assert cfg.train.method == "esft" and cfg.esft.score == "token" and cfg.esft.top_p == 0.2
    assert cfg.esft.sample_tokens == 131072 and cfg.model.chat_template == "deepseek-v2"
