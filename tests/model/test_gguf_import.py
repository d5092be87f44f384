"""GGUF import: dsft's own GGUF export of tiny Llama / Qwen2 models, imported back, gives the source's logits within
the quantization error; DeepSeek's MLA+MoE GGUF (deepseek2) is refused in one line; `.gguf` as name_or_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsft.errors import ModelError, OverwriteError
from dsft.export.gguf import gguf_unavailable_reason
from dsft.model.gguf_import import import_gguf, read_gguf_header, resolve_gguf

PROBE = "头痛、发烧三天，应该怎么办？ Headache for 3 days, 体温38.5℃。"


def _why_not() -> str | None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is absent (pip install 'dsft[gguf]')"
    return gguf_unavailable_reason()


_WHY = _why_not()
needs_gguf = pytest.mark.skipif(_WHY is not None, reason=f"GGUF extra absent: {_WHY}")


def _dsft(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _tiny_source(d: Path, family: str) -> Path:
    """A tiny random-init Llama or Qwen2 (hidden 256: Q4_K blocks are 256 wide) with dsft's embedded BPE tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    kw = dict(vocab_size=(len(tok) + 64) // 64 * 64, hidden_size=256,  # padded, as Qwen2 and Llama releases are intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, tie_word_embeddings=False, max_position_embeddings=512)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw))
    with torch.no_grad():  # random init is ~N(0, 0.02): scale up so logits differ measurably between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits[0].float()


def _llama_cpp_logits(gguf_file: Path, ids: list[int]) -> torch.Tensor:
    from dsft.model.gguf import load_gguf

    llm = load_gguf(gguf_file, n_ctx=128, n_threads=1)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """dsft's GGUF export (the export stage's make_gguf: llama.cpp's converter, then its Q4_K_M quantizer)."""
    if _WHY is not None:
        pytest.skip(f"GGUF extra absent: {_WHY}")
    from dsft.export.gguf import make_gguf

    out = {}
    root = tmp_path_factory.mktemp("gguf_src")
    for family in ("llama", "qwen2"):
        src = _tiny_source(root / family, family)
        files = {kind: src / "gguf" / make_gguf(src, src / "gguf", kind)["file"] for kind in ("f16", "q8_0", "q4_k_m")}
        out[family] = (src, files)
    return out


@needs_gguf
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_import_gives_the_source_logits_within_the_quantization_error(exported, family, tmp_path):
    from transformers import AutoTokenizer

    src, files = exported[family]
    src_tok = AutoTokenizer.from_pretrained(str(src))
    ids = src_tok(PROBE, return_tensors="pt")["input_ids"]
    ref = _logits(src, ids)
    scale = float(ref.abs().max())
    errors = {}
    for kind, f in files.items():
        note = import_gguf(f, tmp_path / kind)
        assert note["architecture"] == family and note["model_type"] == family
        assert note["quant_type"] == {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}[kind]
        assert len(note["sha256"]) == 64 and note["reload_max_abs_diff"] == 0.0
        assert (tmp_path / kind / "dsft_import.json").is_file() and list((tmp_path / kind).glob("*.safetensors"))
        got = _logits(tmp_path / kind, ids)
        err = float((got - ref).abs().max())
        # llama.cpp running the same file is the yardstick of "the quantization error" of this kind
        cpp = float((_llama_cpp_logits(f, ids[0].tolist()) - ref).abs().max())
        errors[kind] = (err, cpp)
        assert err <= 1.5 * cpp + 1e-3 * scale, (kind, err, cpp, scale)
    # (no argmax check: a random-init model's logits are near ties, q8_0 flipped 8 of 30 positions in both families)
    # more bits, less error — and nonzero error from the 4-bit file: the weights really came from the quantized blocks
    assert errors["f16"][0] < errors["q4_k_m"][0], errors
    assert errors["f16"][0] < 0.01 * scale, errors


@needs_gguf
def test_imported_tokenizer_and_chat_template_match_the_source(exported, tmp_path):
    from transformers import AutoTokenizer

    src, files = exported["qwen2"]
    import_gguf(files["q8_0"], tmp_path / "m")
    a, b = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert a(PROBE)["input_ids"] == b(PROBE)["input_ids"]
    assert read_gguf_header(files["q8_0"])["chat_template"] == a.chat_template  # the converter stored it
    chat = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}]
    assert b.apply_chat_template(chat, tokenize=False) == a.apply_chat_template(chat, tokenize=False)
    assert b.eos_token == a.eos_token and b.bos_token == a.bos_token


@needs_gguf
def test_gguf_name_or_path_is_imported_once_into_the_cache(exported, tmp_path, monkeypatch):
    from dsft.model import gguf_import
    from dsft.model.load import resolve_model_dir
    from dsft.model.tokenizer import resolve_tokenizer_path

    monkeypatch.setenv("DSFT_HOME", str(tmp_path / "home"))
    f = exported["llama"][1]["q8_0"]
    d = resolve_model_dir(str(f))
    assert d.parent == tmp_path / "home" / "models" / "gguf" and (d / "config.json").is_file()
    assert json.loads((d / "dsft_import.json").read_text())["source"] == str(f.resolve())

    def no_second_import(*a, **k):
        raise AssertionError("imported twice")

    monkeypatch.setattr(gguf_import, "import_gguf", no_second_import)
    assert resolve_model_dir(str(f)) == d and resolve_tokenizer_path(str(f)) == d
    from dsft.plan.models import resolve_arch

    assert resolve_arch(str(f)).hidden == 256  # the planner reads the imported config.json


@needs_gguf
def test_cli_import_and_info(exported, tmp_path):
    f = exported["qwen2"][1]["q4_k_m"]
    r = _dsft("model", "info", str(f), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen2" and info["file_type"] == "Q4_K_M" and info["importable"] is True
    assert "Q4_K" in info["tensor_types"]
    r = _dsft("model", "import", str(f), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "qwen2, Q4_K_M" in r.stdout and (tmp_path / "out" / "model.safetensors").is_file()
    r = _dsft("model", "import", str(f), "-o", str(tmp_path / "out"))  # refuses to overwrite without --force
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr


@needs_gguf
def test_deepseek_mla_moe_gguf_is_refused_in_one_line(tmp_path):
    """dsft's own GGUF export of the embedded DeepSeek-V3 is llama.cpp arch deepseek2, which transformers cannot read."""
    from dsft.export.gguf import convert
    from dsft.model.load import resolve_model_dir

    f = convert(resolve_model_dir("embedded:tiny-deepseek-v3"), tmp_path / "tiny-v3-f16.gguf", "f16")
    assert read_gguf_header(f)["architecture"] == "deepseek2"
    with pytest.raises(ModelError, match=r"'deepseek2' \(DeepSeek V2/V3/R1 \(MLA \+ MoE\)\) cannot be dequantized"):
        import_gguf(f, tmp_path / "out")
    r = _dsft("model", "import", str(f), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("dsft: error: ") and r.stderr.count("\n") == 1
    assert "R1-Distill-Qwen is qwen2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = _dsft("model", "info", str(f))
    assert r.returncode == 0 and "importable: " in r.stdout and "cannot be dequantized" in r.stdout


def test_not_a_gguf_file_and_truncated_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_header(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (9).to_bytes(8, "little"))
    with pytest.raises(ModelError, match="truncated GGUF file"):
        read_gguf_header(trunc)
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_gguf(tmp_path / "missing.gguf")
    r = _dsft("model", "import", str(bad), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr


def test_import_refuses_to_overwrite(tmp_path, monkeypatch):
    """The output check comes before any dequantization (no model is loaded here)."""
    from dsft.model import gguf_import

    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_import, "read_gguf_header", lambda p: {"architecture": "llama"})
    monkeypatch.setattr(gguf_import, "_require_gguf_reader", lambda: None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OverwriteError, match="--force"):
        import_gguf(f, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
