"""Architectures: transformers' built-in causal LMs load; remote-code advice only where the folder ships code."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dsft.errors import ModelError
from dsft.model.load import TESTED_TYPES, builtin_causal_lm_types, load_model, remote_code_files


def _save(model, d, tok=None):
    model.save_pretrained(str(d))
    if tok is not None:
        tok.save_pretrained(str(d))
    return d


def _tiny_gemma3_text(d):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                           max_position_embeddings=128)
    torch.manual_seed(0)
    return _save(Gemma3ForCausalLM(cfg), d)


def _tiny_llama(d, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, **over)
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(cfg), d)


def _set_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def test_gemma3_text_loads_without_remote_code(tmp_path):
    """The issue's case: gemma3_text is built into transformers, so no trust_remote_code advice and no refusal."""
    d = _tiny_gemma3_text(tmp_path / "g")
    assert json.loads((d / "config.json").read_text())["model_type"] == "gemma3_text"
    m = load_model(d, dtype="float32")
    out = m(input_ids=torch.tensor([[1, 5, 9, 42]])).logits
    assert out.shape == (1, 4, 512) and torch.isfinite(out).all()


def test_untested_builtin_type_loads_with_a_one_line_note(tmp_path, caplog):
    from transformers import Phi3Config, Phi3ForCausalLM

    assert "phi3" in builtin_causal_lm_types() and "phi3" not in TESTED_TYPES
    cfg = Phi3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    d = _save(Phi3ForCausalLM(cfg), tmp_path / "phi3")
    with caplog.at_level(logging.INFO, logger="dsft.model.load"):
        m = load_model(d, dtype="float32")
    assert type(m).__name__ == "Phi3ForCausalLM"
    notes = [r.getMessage() for r in caplog.records if "untested in dsft" in r.getMessage()]
    assert len(notes) == 1 and "'phi3'" in notes[0] and "tested:" in notes[0], notes


def test_tested_types_are_builtin_and_quiet(tmp_path, caplog):
    assert TESTED_TYPES <= builtin_causal_lm_types()
    d = _tiny_llama(tmp_path / "llama")
    with caplog.at_level(logging.INFO, logger="dsft.model.load"):
        load_model(d, dtype="float32")
    assert not [r for r in caplog.records if "untested" in r.getMessage()]


def test_unknown_type_without_code_gets_no_remote_code_advice(tmp_path):
    d = _tiny_llama(tmp_path / "x")
    _set_config(d, model_type="deepseek_custom")
    with pytest.raises(ModelError) as err:
        load_model(d)
    msg = str(err.value)
    assert "'deepseek_custom'" in msg and "ships no modelling code" in msg
    assert "trust_remote_code: true" not in msg and "\n" not in msg
    # asking for remote code does not help when there is none: the same refusal, not a transformers traceback
    with pytest.raises(ModelError, match="ships no modelling code"):
        load_model(d, trust_remote_code=True)


def test_auto_map_without_its_py_file_is_not_remote_code(tmp_path):
    d = _tiny_llama(tmp_path / "x")
    _set_config(d, model_type="dsft_custom", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    assert remote_code_files(d) == []
    with pytest.raises(ModelError, match="ships no modelling code"):
        load_model(d)


CONFIG_PY = """from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "dsft_custom"
"""
MODELING_PY = """from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def _remote_code_folder(d):
    _tiny_llama(d)
    _set_config(d, model_type="dsft_custom", architectures=["CustomForCausalLM"],
                auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (d / "configuration_custom.py").write_text(CONFIG_PY)
    (d / "modeling_custom.py").write_text(MODELING_PY)
    return d


def test_remote_code_folder_gets_the_advice_and_loads_when_trusted(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = _remote_code_folder(tmp_path / "custom")
    assert remote_code_files(d) == ["configuration_custom.py", "modeling_custom.py"]
    with pytest.raises(ModelError) as err:
        load_model(d)
    msg = str(err.value)
    assert "set model.trust_remote_code: true only if you trust it" in msg and "modeling_custom.py" in msg
    m = load_model(d, dtype="float32", trust_remote_code=True)
    assert type(m).__name__ == "CustomForCausalLM"
    assert m(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)



def test_auto_map_forms_hub_prefixed_and_tokenizer_lists(tmp_path):
    d = _remote_code_folder(tmp_path / "custom")
    _set_config(d, auto_map={"AutoModelForCausalLM": "org/repo--modeling_custom.CustomForCausalLM",
                             "AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})
    assert remote_code_files(d) == ["modeling_custom.py"]  # tokenization_custom.py is not in the folder
