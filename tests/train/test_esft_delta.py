"""ESFT deltas: base + delta == merged (on disk and in memory), a wrong base refused, `dsft esft profile/merge`,
the export stage shipping the delta, and `dsft serve --esft` answering over the OpenAI API (real openai client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from esft_helpers import build_moe
from safetensors.torch import load_file
from test_esft import esft_cfg, run_esft

from dsft.errors import ModelError
from dsft.model.esft_delta import apply_delta, merge_delta, read_delta
from dsft.model.load import load_model

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def trained(request, tmp_path_factory, records16):
    root = tmp_path_factory.mktemp("delta-" + request.param)
    base = build_moe(root / "base", request.param)
    run_esft(root / "run", base, records16, max_steps=2)
    return {"kind": request.param, "root": root, "base": base, "run": root / "run",
            "delta": root / "run" / "train" / "esft"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "dsft", *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_base_plus_delta_equals_the_trained_model(trained):
    merged = trained["root"] / "merged"
    res = merge_delta(trained["delta"], merged)
    want = load_file(str(trained["run"] / "train/model/model.safetensors"))
    got = load_file(str(merged / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert res["replaced_tensors"] == len(read_delta(trained["delta"])[0])
    # in memory: base + delta gives the trained model's parameters bit for bit (fused 3-D experts included)
    model = load_model(trained["base"], dtype="float32")
    apply_delta(model, trained["delta"], base_dir=trained["base"])
    ref = load_model(trained["run"] / "train/model", dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    size = (trained["delta"] / "esft_delta.safetensors").stat().st_size
    assert size < 0.1 * (merged / "model.safetensors").stat().st_size
    with pytest.raises(ModelError, match="already exists and is not empty"):
        merge_delta(trained["delta"], merged)


def test_a_delta_is_refused_on_another_base(trained, tmp_path):
    other = build_moe(tmp_path / "other", "deepseek_v3", seed=1)
    with pytest.raises(ModelError, match="holds other weights for the experts it replaces"):
        merge_delta(trained["delta"], tmp_path / "out", base=other)
    with pytest.raises(ModelError, match="not an ESFT delta"):
        merge_delta(trained["base"], tmp_path / "out2")


def test_cli_profile_writes_scores_that_train_reuses_and_merge_errors_in_one_line(trained, records16, tmp_path):
    root = tmp_path / "run"
    from train_helpers import make_run

    make_run(root, records16)
    cfg = esft_cfg(root, trained["base"]).model_dump(mode="json", exclude={"resolution"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    p = _cli("esft", "profile", str(tmp_path / "cfg.yaml"))
    assert p.returncode == 0, p.stderr
    assert "routed experts" in p.stdout and "layer   1:" in p.stdout
    scores = json.loads((root / "esft/expert_scores.json").read_text())
    in_train = json.loads((trained["run"] / "esft/expert_scores.json").read_text())
    assert set(scores["layers"]) == {"1", "2"} and scores["tokens"] == in_train["tokens"] > 1000
    # same base, data, sample and seed: the scores and the choice `dsft train` made, and a fingerprint train reuses
    assert scores["layers"] == in_train["layers"] and scores["selection"] == in_train["selection"]
    assert scores["fingerprint"] == in_train["fingerprint"]
    bad = _cli("esft", "merge", str(tmp_path), "-o", str(tmp_path / "m"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not an ESFT delta" in bad.stderr


def test_export_ships_the_delta_next_to_the_merged_model(trained):
    from dsft.config import config_from_dict
    from dsft.export.stage import run as export
    from dsft.run import RunDir

    cfg = config_from_dict({"run_dir": str(trained["run"]), "model": {"name_or_path": str(trained["base"])}})
    m = export(cfg, RunDir(trained["run"]), force=True)
    out = trained["run"] / "export"
    assert m["esft_delta"] == "esft_delta" and (out / "esft_delta/esft_delta.json").exists()
    assert m["esft_delta_bytes"] == (trained["delta"] / "esft_delta.safetensors").stat().st_size
    assert m["within_tolerance"] and m["method"] == "esft"


def test_serve_esft_answers_over_the_openai_api_as_the_merged_model_does(trained):
    if trained["kind"] != "deepseek_v3":
        pytest.skip("one architecture is enough for the server")
    from openai import OpenAI

    from dsft.config import ServeConfig
    from dsft.serve.background import serve_in_background
    from dsft.serve.settings import resolve

    model, cfg = resolve(model=None, run=None, config=None, loras=[], flags={"esft_delta": str(trained["delta"]),
                                                                              "port": 0})
    assert Path(model) == trained["base"].resolve() and cfg.served_model_name == "base+esft"
    texts, ids = {}, {}
    for name, (mdir, scfg) in {"esft": (model, cfg),
                               "merged": (str(trained["run"] / "train/model"), ServeConfig(port=0))}.items():
        with serve_in_background(mdir, scfg) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            ids[name] = [m.id for m in client.models.list().data]
            r = client.chat.completions.create(model=ids[name][0], messages=[{"role": "user", "content": "头痛怎么办？"}],
                                               max_tokens=8, temperature=0)
            texts[name] = r.choices[0].message.content
    assert ids == {"esft": ["base+esft"], "merged": ["model"]}
    assert texts["esft"] == texts["merged"] and texts["esft"]
    with pytest.raises(Exception, match="needs the transformers engine"):
        resolve(model=None, run=None, config=None, loras=[], flags={"esft_delta": str(trained["delta"]),
                                                                    "engine": "vllm"})
