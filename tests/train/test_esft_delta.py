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


def _fp8_base_and_its_copy(src: Path, fp8_dir: Path, copy_dir: Path, block=(32, 32)) -> None:
    """From a tiny model folder: a *sharded* FP8 base as DeepSeek ships V3 (every `*_proj.weight` e4m3 + its
    `weight_scale_inv`; all scales in the second shard, away from their weights) and the FP32 copy dequantized
    from it, the copy a user trains on."""
    import shutil

    from safetensors.torch import save_file

    from dsft.model.fp8 import dequantize, quantization_config, quantize

    sd = load_file(str(src / "model.safetensors"))
    weights, scales, copy = {}, {}, {}
    for k, t in sd.items():
        if t.ndim == 2 and k.endswith("_proj.weight"):
            q, s = quantize(t, block)
            weights[k], scales[k + "_scale_inv"], copy[k] = q, s, dequantize(q, s, block)
        else:
            weights[k] = copy[k] = t
    for d in (fp8_dir, copy_dir):
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, d / f.name)
    save_file(weights, str(fp8_dir / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(fp8_dir / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in weights},
                                            **{k: "model-00002-of-00002.safetensors" for k in scales}}}
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = quantization_config(block)
    (fp8_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    save_file(copy, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})


def test_merge_into_a_sharded_fp8_base_requantizes_only_the_trained_experts(tmp_path, records16):
    from dsft.model.fp8 import dequantize, quantize, relative_error

    block = (32, 32)
    _fp8_base_and_its_copy(build_moe(tmp_path / "src", "deepseek_v3"), tmp_path / "fp8", tmp_path / "bf16", block)
    run_esft(tmp_path / "run", tmp_path / "bf16", records16, esft={"experts": {1: [3], 2: [0, 5]}}, max_steps=2)
    delta_dir = tmp_path / "run/train/esft"
    delta, meta = read_delta(delta_dir)
    assert meta["base_dtype"] == "float32" and len(delta) == 9
    res = merge_delta(delta_dir, tmp_path / "merged", base=tmp_path / "fp8")
    assert res["fp8"] and res["replaced_tensors"] == 9
    assert json.loads((tmp_path / "merged/config.json").read_text())["quantization_config"]["weight_block_size"] == [32, 32]
    assert (tmp_path / "merged/model.safetensors.index.json").read_bytes() == \
        (tmp_path / "fp8/model.safetensors.index.json").read_bytes()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        base, got = load_file(str(tmp_path / "fp8" / shard)), load_file(str(tmp_path / "merged" / shard))
        assert base.keys() == got.keys()
        changed = {k for k in base if not torch.equal(base[k].view(torch.uint8), got[k].view(torch.uint8))}
        weight = {k.removesuffix("_scale_inv") for k in changed}
        assert weight <= set(delta)  # nothing but the trained experts' weights and scales changed
        assert changed, shard  # both shards: the weights in one, their scales in the other
    w = load_file(str(tmp_path / "merged/model-00001-of-00002.safetensors"))
    s = load_file(str(tmp_path / "merged/model-00002-of-00002.safetensors"))
    for k, t in delta.items():
        q, sc = quantize(t.float(), block)
        assert w[k].dtype == torch.float8_e4m3fn and torch.equal(w[k].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(s[k + "_scale_inv"], sc)
        assert relative_error(t, dequantize(w[k], s[k + "_scale_inv"], block))[1] < 0.02
    other = tmp_path / "other"
    _fp8_base_and_its_copy(build_moe(tmp_path / "src2", "deepseek_v3", seed=1), other, tmp_path / "other-copy", block)
    with pytest.raises(ModelError, match="holds other weights"):
        merge_delta(delta_dir, tmp_path / "merged2", base=other)


def test_serve_esft_on_an_fp8_base_serves_what_the_fp8_merge_holds(tmp_path, records16):
    """`dsft serve --esft DELTA --model FP8_BASE`: the base loads kept e4m3 (one FP8 module per expert), the trained
    experts are re-quantized into its blocks exactly as `dsft esft merge --base FP8_BASE` writes them, so base +
    delta and the merged FP8 folder give the same logits and the same answer over the OpenAI API."""
    from openai import OpenAI

    from dsft.config import ServeConfig
    from dsft.model.esft_delta import apply_delta
    from dsft.model.fp8_linear import has_fp8
    from dsft.model.load import load_model
    from dsft.serve.background import serve_in_background
    from dsft.serve.settings import resolve

    block = (32, 32)
    _fp8_base_and_its_copy(build_moe(tmp_path / "src", "deepseek_v3"), tmp_path / "fp8", tmp_path / "bf16", block)
    run_esft(tmp_path / "run", tmp_path / "bf16", records16, esft={"experts": {1: [3], 2: [0, 5]}}, max_steps=2)
    delta = tmp_path / "run/train/esft"
    merge_delta(delta, tmp_path / "merged", base=tmp_path / "fp8")
    ids = torch.tensor([[1, 20, 300, 45, 7, 99, 12]])
    base = load_model(tmp_path / "fp8", dtype="float32").eval()
    assert has_fp8(base)
    with torch.no_grad():
        before = base(ids).logits
        apply_delta(base, delta, base_dir=tmp_path / "fp8")
        got = base(ids).logits
        want = load_model(tmp_path / "merged", dtype="float32").eval()(ids).logits
    assert torch.equal(got, want) and (got - before).abs().max() > 1e-4  # the delta changed the model

    model, cfg = resolve(model=str(tmp_path / "fp8"), run=None, config=None, loras=[],
                         flags={"esft_delta": str(delta), "port": 0})
    texts = {}
    for name, (mdir, scfg) in {"esft": (model, cfg), "merged": (str(tmp_path / "merged"), ServeConfig(port=0))}.items():
        with serve_in_background(mdir, scfg) as url:
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            mid = client.models.list().data[0].id
            r = client.chat.completions.create(model=mid, messages=[{"role": "user", "content": "头痛怎么办？"}],
                                               max_tokens=8, temperature=0)
            texts[name] = r.choices[0].message.content
    assert texts["esft"] == texts["merged"] and texts["esft"]
