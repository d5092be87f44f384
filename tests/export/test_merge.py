"""Export stage: LoRA merged into the base, saved for plain transformers, logits checked, manifest, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import make_lora_adapter, make_run, read_json

from dsft.config import config_from_dict
from dsft.errors import ModelError, OverwriteError
from dsft.export.stage import run as export

TEXT = "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办？<｜Assistant｜>多休息。<｜end▁of▁sentence｜>"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _cfg(run_root: Path, **export_kw):
    return config_from_dict({"run_dir": str(run_root), "export": export_kw})


def _peft_logits(base_dir: Path, adapter_dir: Path | None, text: str = TEXT):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    m = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        m = PeftModel.from_pretrained(m, str(adapter_dir))
    m.eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits[0].float()


def _plain_subprocess(model_dir: Path, text: str = TEXT) -> dict:
    """Load model_dir in a fresh python with plain transformers only (no dsft on the path)."""
    code = f"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
d = {str(model_dir)!r}
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d)
gc = GenerationConfig.from_pretrained(d)
chat = tok.apply_chat_template([{{"role": "user", "content": "头痛怎么办"}}], add_generation_prompt=True, tokenize=False)
ids = tok({text!r}, add_special_tokens=False, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = m(input_ids=ids, use_cache=False).logits[0].float()
    gen = m.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
print(json.dumps({{"chat": chat, "dtype": str(next(m.parameters()).dtype), "logits": logits.tolist(),
                  "eos": gc.eos_token_id, "gen_len": int(gen.shape[1]), "dsft": "dsft" in sys.modules}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=model_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_merged_lora_loads_with_plain_transformers_and_matches_adapter(tmp_path, tiny_base, tiny_adapter):
    import torch

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    m = export(_cfg(run.root), run)
    on_disk = read_json(run.root / "export" / "manifest.json")
    for key in ("merged", "dtype", "max_abs_diff", "variants"):
        assert key in m and key in on_disk, key
    assert m["dtype"] == "float32" and m["merged"] == "merged" and m["adapter_type"] == "lora"
    assert m["max_abs_diff"] < 1e-4 and m["within_tolerance"]
    assert [v["name"] for v in m["variants"]] == ["merged"] and m["variants"][0]["size_bytes"] > 1e6
    merged = run.root / "export" / "merged"
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    assert not (merged / "adapter_config.json").exists()

    plain = _plain_subprocess(merged)
    assert plain["dsft"] is False and plain["dtype"] == "torch.float32"
    assert plain["chat"] == "<｜begin▁of▁sentence｜><｜User｜>头痛怎么办<｜Assistant｜>"
    assert plain["eos"] is not None and plain["gen_len"] == 10
    got = torch.tensor(plain["logits"])
    want = _peft_logits(tiny_base, tiny_adapter)
    base_only = _peft_logits(tiny_base, None)
    assert (got - want).abs().max() < 1e-4
    # the adapter really changed the model (a merge that dropped it would fail here)
    assert (got - base_only).abs().max() > 100 * float((got - want).abs().max()) and (got - base_only).abs().max() > 1e-2


def test_existing_export_needs_force(tmp_path, tiny_base, tiny_adapter):
    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    export(_cfg(run.root), run)
    with pytest.raises(OverwriteError, match="--force"):
        export(_cfg(run.root), run)
    m = export(_cfg(run.root, dtype="bfloat16"), run, force=True)
    assert m["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_saved_and_diff_reported(tmp_path, tiny_base, tiny_adapter, dtype):
    from safetensors import safe_open

    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    m = export(_cfg(run.root, dtype=dtype), run)
    f = next((run.root / "export" / "merged").glob("*.safetensors"))
    with safe_open(str(f), "pt") as sf:
        dtypes = {str(sf.get_slice(k).get_dtype()) for k in sf.keys()}
    assert dtypes == {"F16" if dtype == "float16" else "BF16"}
    assert 0 < m["max_abs_diff"] < m["tolerance"]
    assert m["max_abs_diff_fp32_merge"] < 1e-4


@pytest.mark.parametrize("kind", ["dora", "experts"])
def test_dora_and_fused_expert_lora_merge_faithfully(tmp_path, tiny_base, kind):
    # PEFT cannot put DoRA on the fused 3-D expert parameters (ParamWrapper), so they are two adapters.
    adapter = make_lora_adapter(tiny_base, tmp_path / kind, seed=3, use_dora=kind == "dora", experts=kind == "experts")
    run = make_run(tmp_path / "run", tiny_base, adapter)
    m = export(_cfg(run.root), run)
    assert m["adapter_type"] == ("dora" if kind == "dora" else "lora") and m["max_abs_diff"] < 1e-4


def test_full_finetune_model_is_resaved(tmp_path, tiny_base):
    run = make_run(tmp_path / "run", tiny_base, None, model_dir=tiny_base)
    m = export(_cfg(run.root), run)
    assert m["adapter"] is None and m["max_abs_diff"] == 0.0 and m["method"] == "full"


def test_missing_train_manifest_and_bad_adapter_are_one_line(tmp_path, tiny_base):
    from dsft.run import RunDir

    with pytest.raises(Exception, match="dsft train"):
        export(_cfg(tmp_path / "empty"), RunDir(tmp_path / "empty"))
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    run = make_run(tmp_path / "run", tiny_base, bad)
    with pytest.raises(ModelError, match="adapter_config.json"):  # dsft.model.adapters.check_adapter_dir
        export(_cfg(run.root), run)


def test_cli_direct_mode_and_errors(tmp_path, tiny_base, tiny_adapter):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dsft", "export", "--model", str(tiny_base), "--adapter", str(tiny_adapter), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["max_abs_diff"] < 1e-4
    assert read_json(out / "manifest.json")["merged"] == "merged"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:-4] + ["--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_config_mode(tmp_path, tiny_base, tiny_adapter):
    run = make_run(tmp_path / "run", tiny_base, tiny_adapter)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {run.root}\nexport:\n  dtype: float16\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dsft", "export", str(cfg)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_json(run.root / "export" / "manifest.json")
    assert m["dtype"] == "float16" and m["stage"] == "export" and (run.root / "export" / "merged" / "config.json").exists()


def test_cli_direct_mode_with_eval_data_then_eval_quant(tmp_path, tiny_base, tiny_adapter):
    data = tmp_path / "held_out.jsonl"
    rows = [{"question": "胃痛怎么办？", "answer": "少食多餐，必要时就医。", "domain": "消化科"},
            {"question": "失眠怎么调理？", "answer": "规律作息。", "domain": "神经科"}]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dsft", "export", "--model", str(tiny_base), "--adapter", str(tiny_adapter), "-o", str(out),
           "--eval-data", str(data), "--formats", "merged,int8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "quant_report.json").exists()  # export writes; eval measures
    r = subprocess.run([sys.executable, "-m", "dsft", "eval", "quant", str(out), "--eval-data", str(data),
                        "--set", "export.report_new_tokens=4"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = read_json(out / "quant_report.json")
    assert rep["samples"] == 2 and rep["classified"] == 2 and [x["variant"] for x in rep["rows"]] == ["merged", "int8"]
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n', encoding="utf-8")
    r = subprocess.run(cmd[:8] + ["-o", str(tmp_path / "o2"), "--eval-data", str(tmp_path / "bad.jsonl")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "bad.jsonl:1: expected a record" in r.stderr
    r = subprocess.run(cmd[:8] + ["-o", str(tmp_path / "o3"), "--report"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "dsft eval CONFIG --variants" in r.stderr and "Traceback" not in r.stderr
