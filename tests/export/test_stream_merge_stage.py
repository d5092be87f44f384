"""`dsft export` on a sharded FP8 base: the export stage takes the streaming merge (fp8 / bf16 out), its manifest and
report; the CLI's --dtype fp8 and its refusals (one line, exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import make_run, read_json
from test_stream_merge import dequantized_folder, make_adapter, read_all, write_shipped

from dsft.config import config_from_dict
from dsft.errors import ExportError
from dsft.export.stage import run as export
from dsft.model import fp8

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def fp8_world(tmp_path_factory):
    from dsft.model.tokenizer import embedded_tokenizer_dir

    root = tmp_path_factory.mktemp("stage")
    tok_dir = embedded_tokenizer_dir()
    from transformers import AutoTokenizer

    base = write_shipped(root / "base", vocab=len(AutoTokenizer.from_pretrained(str(tok_dir))), tokenizer_dir=tok_dir)
    adapter = make_adapter(dequantized_folder(base, root / "ref"), root / "adapter")
    return {"root": root, "base": base, "adapter": adapter}


@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_export_stage_streams_a_sharded_fp8_base(tmp_path, fp8_world, dtype):
    run = make_run(tmp_path / "run", fp8_world["base"], fp8_world["adapter"])
    m = export(config_from_dict({"run_dir": str(run.root), "export": {"dtype": dtype}}), run)
    on_disk = read_json(run.root / "export" / "manifest.json")
    assert on_disk["merge"] == m["merge"] == "stream" and m["dtype"] == dtype and m["max_abs_diff"] is None
    assert m["adapter_type"] == "lora" and m["stream"]["shards"] == 4 and m["params"] > 1e6
    rep = read_json(run.root / "export" / m["stream_report"])
    assert rep == json.loads(json.dumps(m["stream"]))
    merged = run.root / "export" / "merged"
    cfg = read_json(merged / "config.json")
    assert ("quantization_config" in cfg) == (dtype == "fp8") and cfg["num_nextn_predict_layers"] == 1
    assert (merged / "tokenizer.json").exists() and (merged / "chat_template.jinja").exists()
    out, src = read_all(merged), read_all(fp8_world["base"])
    mtp = [k for k in src if k.startswith("model.layers.3.") and not (dtype != "fp8" and k.endswith("_scale_inv"))]
    for k in mtp:
        want = src[k] if dtype == "fp8" or src[k].dtype != fp8.FP8_DTYPE else \
            fp8.dequantize(src[k], src[k + "_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k
    if dtype == "fp8":
        assert set(m["requant_error"]) == {"attention", "dense_mlp", "shared_experts", "routed_experts"}
        assert m["variants"][0]["format"] == "safetensors+fp8"
    else:
        assert m["requant_error"] == {}


def test_fp8_with_other_variants_is_refused_before_work(tmp_path, fp8_world):
    run = make_run(tmp_path / "run", fp8_world["base"], fp8_world["adapter"])
    with pytest.raises(ExportError, match="with export.dtype fp8 only 'merged'"):
        export(config_from_dict({"run_dir": str(run.root), "export": {"dtype": "fp8", "formats": ["merged", "int8"]}}), run)
    assert not (run.root / "export" / "merged").exists()


def _dsft(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_dtype_fp8_and_its_one_line_refusal(tmp_path, fp8_world):
    out = tmp_path / "out"
    r = _dsft("export", "--model", str(fp8_world["base"]), "--adapter", str(fp8_world["adapter"]), "-o", str(out),
              "--dtype", "fp8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["dtype"] == "fp8" and read_json(out / "manifest.json")["merge"] == "stream"
    plain = dequantized_folder(fp8_world["base"], tmp_path / "plain")  # a single-file fp32 base: not FP8
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(fp8_world["base"] / f, plain / f)
    r = _dsft("export", "--model", str(plain), "--adapter", str(fp8_world["adapter"]), "-o", str(tmp_path / "o2"),
              "--dtype", "fp8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("dsft: error:")]
    assert len(lines) == 1 and "fp8 needs an FP8 base" in lines[0], r.stderr[-2000:]
