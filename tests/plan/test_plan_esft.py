"""The planner on train.method esft: only the selected routed experts train (trainable copies, their gradients and
AdamW state), layers before the first selected one keep nothing; from flags, from esft.experts and from a profile.
(The estimate is checked against measured steps in test_plan_accuracy.)"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsft.config import config_from_dict
from dsft.errors import ConfigError
from dsft.plan import PlanRequest, estimate, parse_gpu, resolve_arch
from dsft.plan.activations import activations
from dsft.plan.from_config import request_from_config

ROOT = Path(__file__).resolve().parents[2]


def _req(**kw) -> PlanRequest:
    return PlanRequest(resolve_arch("deepseek-v2-lite"), method="esft", gpu=parse_gpu("A100-80GB"), **kw).validate()


def test_only_the_selected_experts_train():
    a = resolve_arch("deepseek-v2-lite")  # 64 routed experts per MoE layer, 26 MoE layers after one dense layer
    e = estimate(_req())
    assert e.trainable_params == 26 * 13 * a.expert_params()  # ceil(0.2 × 64) = 13 experts per layer
    assert e.adapter == e.gradients == e.trainable_params * 2  # bf16 copies and their gradients
    # AdamW's two moments in the parameters' dtype + foreach AdamW's √v temporary at the step (the peak here)
    assert e.phase == "optimizer step" and e.optimizer == e.trainable_params * 2 * (2 + 1)
    three = estimate(_req(esft_experts=3))
    assert three.trainable_params == 26 * 3 * a.expert_params() < e.trainable_params
    full = estimate(replace(_req(), method="full"))
    assert e.trainable_params < 0.25 * full.trainable_params and e.allocated < full.allocated


def test_layers_before_the_first_selected_one_keep_nothing():
    late = _req(esft_experts={20: 4, 26: 2})
    acts = activations(late)
    assert all(x == 0 for x in acts.saved[:20]) and acts.saved[20] > 0 and acts.saved[21] > acts.saved[20]
    assert estimate(late).activations < estimate(_req(esft_experts={1: 4, 26: 2})).activations


def test_esft_needs_a_moe_model_and_sane_flags():
    with pytest.raises(ConfigError, match="MoE model"):
        PlanRequest(resolve_arch("deepseek-llm-7b"), method="esft").validate()
    with pytest.raises(ConfigError, match="esft-top-p"):
        _req(esft_top_p=1.5)


def test_request_from_config_reads_esft_experts_and_the_run_profile(tmp_path):
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-v2-lite"}, "run_dir": str(tmp_path),
                            "train": {"method": "esft"}, "esft": {"experts": {"1": [0, 5], "3": [7]}}})
    r = request_from_config(cfg, gpu=parse_gpu("A100-80GB"))
    assert r.method == "esft" and r.esft_experts == {1: 2, 3: 1} and r.esft_top_p == 0.2
    prof = tmp_path / "esft"
    prof.mkdir()
    token = [0.0] * 64
    token[4], token[9] = 0.15, 0.1
    (prof / "expert_scores.json").write_text(json.dumps({
        "layers": {"2": {"token": token}}, "selection": {"experts": {"2": [4, 9]}}}))
    cfg = config_from_dict({"model": {"name_or_path": "deepseek-v2-lite"}, "run_dir": str(tmp_path),
                            "train": {"method": "esft"}})
    r = request_from_config(cfg, gpu=parse_gpu("A100-80GB"))
    assert r.esft_experts == {2: 2} and r.esft_top_p == pytest.approx(0.25)  # the profile's own token share


def test_dsft_plan_method_esft_cli():
    r = subprocess.run([sys.executable, "-m", "dsft", "plan", "--model", "deepseek-v2-lite", "--method", "esft",
                        "--esft-experts", "4", "--json"], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["setup"]["method"] == "esft" and d["setup"]["trainable_params"] == 26 * 4 * 3 * 2048 * 1408
    assert d["setup"]["esft_experts"] == {str(i): 4 for i in range(1, 27)}
