"""Model loading: embedded tiny DeepSeek-V3, safetensors only, hub ids and missing weights explained."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsft.config import ModelConfig
from dsft.errors import ModelError
from dsft.model.load import load_model_and_tokenizer, resolve_model_dir


def test_embedded_model_is_deepseek_v3_mla_moe():
    model, tok, mdir = load_model_and_tokenizer(ModelConfig())
    cfg = model.config
    assert cfg.model_type == "deepseek_v3"
    assert cfg.n_routed_experts >= 2 and cfg.q_lora_rank and cfg.kv_lora_rank
    names = {n for n, _ in model.named_parameters()}
    assert any("kv_a_proj_with_mqa" in n for n in names)
    assert any("mlp.experts" in n for n in names) and any("shared_experts" in n for n in names)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 10e6
    assert len(tok) == cfg.vocab_size
    assert list(mdir.glob("*.safetensors"))


def test_embedded_model_loads_with_plain_transformers(tmp_path):
    mdir = resolve_model_dir("embedded:tiny-deepseek-v3")
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(mdir)!r}); t = AutoTokenizer.from_pretrained({str(mdir)!r})\n"
        "x = t.apply_chat_template([{'role':'user','content':'头痛怎么办'}], add_generation_prompt=True, tokenize=False)\n"
        "assert x == '<｜begin▁of▁sentence｜><｜User｜>头痛怎么办<｜Assistant｜>', x\n"
        "assert 'dsft' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_hub_id_fails_with_one_clear_line():
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model_dir("deepseek-ai/deepseek-llm-7b-base")


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="safetensors only"):
        resolve_model_dir(str(tmp_path))


def test_missing_folder_and_no_config(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_remote_code_model_type_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_custom"}', encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"")
    from dsft.model.load import load_model

    with pytest.raises(ModelError, match="ships no modelling code"):  # no code in the folder: no remote-code advice
        load_model(tmp_path)


def test_an_incomplete_embedded_model_folder_is_rebuilt(tmp_path, monkeypatch):
    """A folder left without config.json (an interrupted older build) must not be returned as the model."""
    from dsft.model.tiny import TINY_VERSION, embedded_model_dir

    monkeypatch.setenv("DSFT_HOME", str(tmp_path))
    broken = tmp_path / "models" / f"tiny-deepseek-v3-{TINY_VERSION}"
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}")
    d = embedded_model_dir()
    assert d == broken and (d / "config.json").exists() and (d / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [d.name]
