"""Import a GGUF checkpoint as a training base: dequantize it through transformers into a safetensors folder."""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from dsft.errors import ModelError, OverwriteError
from dsft.model.paths import dsft_home
from dsft.run import sha256_file

log = logging.getLogger(__name__)

PROVENANCE = "dsft_import.json"
# GGUF architectures dsft's tests import (tests/model/test_gguf_import.py: tiny llama and qwen2 written by llama.cpp's
# converter, the real Gemma-3-270M Q4_K_M). Others that transformers reads are imported with a one-line note.
TESTED_ARCHS = {"llama", "qwen2", "gemma3"}
# What GGUF files of DeepSeek's own releases are: R1-Distill-Qwen → qwen2, R1-Distill-Llama / DeepSeek-LLM / Coder →
# llama, DeepSeek V2/V3/R1 (MLA + MoE) → deepseek2, which transformers cannot dequantize (no GGUF mapping).
DEEPSEEK_HINT = {"deepseek2": "DeepSeek V2/V3/R1 (MLA + MoE)", "deepseek": "DeepSeek MoE"}

# general.file_type (llama.cpp's LLAMA_FTYPE_*) → the name users know the file by
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
              37: "TQ2_0", 38: "MXFP4_MOE"}
# ggml tensor types (ggml.h: enum ggml_type)
TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
                11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
                19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
                27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# GGUF metadata value types: id → struct format of a scalar (8 = string, 9 = array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads over a memory-mapped GGUF file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF file (header ends at byte {self.pos})")
        (val,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return val

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ModelError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}")
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if itype in _SCALAR and not keep_arrays:  # skip fixed-size arrays without decoding them
            self.pos += struct.calcsize(_SCALAR[itype]) * count
            return {"array_of": itype, "count": count}
        if itype == _STRING and not keep_arrays:  # e.g. a 262 k-token vocabulary: hop over the strings
            buf, pos, unpack = self.buf, self.pos, struct.unpack_from
            for _ in range(count):
                pos += 8 + unpack("<Q", buf, pos)[0]
            self.pos = pos
            return {"array_of": itype, "count": count}
        items = [self.value(itype, keep_arrays) for _ in range(count)]
        return items if keep_arrays else {"array_of": itype, "count": count}


def read_gguf_header(path: str | Path) -> dict[str, Any]:
    """Metadata (arrays summarised as counts) and tensor-type counts of a GGUF file, without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if bytes(buf[:4]) != b"GGUF":
                raise ModelError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.unpack("<I")
            if version < 2:
                raise ModelError(f"{path}: GGUF version {version} is too old (2 or later expected); re-convert it with llama.cpp")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            meta = {}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.unpack("<I"), keep_arrays=False)
            types: dict[str, int] = {}
            for _ in range(n_tensors):
                cur.string()
                n_dims = cur.unpack("<I")
                cur.pos += 8 * n_dims
                t = TENSOR_TYPES.get(cur.unpack("<I"), "?")
                cur.unpack("<Q")
                types[t] = types.get(t, 0) + 1
    except (OSError, ValueError) as err:  # ValueError: mmap of an empty file
        raise ModelError(f"{path}: cannot read the GGUF file ({err})") from err
    arch = str(meta.get("general.architecture", "?"))
    ftype = meta.get("general.file_type")
    return {"version": version, "architecture": arch, "name": meta.get("general.name"),
            "file_type": FILE_TYPES.get(ftype, f"file_type {ftype}") if ftype is not None else None,
            "tensor_types": dict(sorted(types.items())), "n_tensors": n_tensors,
            "chat_template": meta.get("tokenizer.chat_template"), "tokenizer_model": meta.get("tokenizer.ggml.model"),
            "context_length": meta.get(f"{arch}.context_length"), "block_count": meta.get(f"{arch}.block_count")}


def transformers_gguf_archs() -> set[str]:
    """GGUF architectures the installed transformers can dequantize (its legacy table and its packed-weight path)."""
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_CONFIG_ARCHS)


def check_importable(path: Path, header: dict[str, Any]) -> None:
    """One line refusing a GGUF architecture transformers cannot read; a note for readable but untested ones."""
    import transformers

    arch = header["architecture"]
    known = transformers_gguf_archs()
    if arch not in known and _RENAMED.get(arch) not in known:
        what = f" ({DEEPSEEK_HINT[arch]})" if arch in DEEPSEEK_HINT else ""
        raise ModelError(
            f"{path}: GGUF architecture '{arch}'{what} cannot be dequantized by transformers {transformers.__version__}, "
            f"which reads GGUF {', '.join(sorted(a for a in known if a in _CAUSAL_GGUF))} (R1-Distill-Qwen is qwen2, "
            f"R1-Distill-Llama / DeepSeek-LLM are llama); use the model's safetensors release instead")
    if arch not in TESTED_ARCHS:
        log.info("note: GGUF architecture '%s' is read by transformers but untested in dsft (tested: %s)",
                 arch, ", ".join(sorted(TESTED_ARCHS)))


# llama.cpp's architecture names that transformers' GGUF tables spell differently
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
# GGUF architectures whose transformers model is a causal LM (t5/umt5 are encoder-decoders; listed for the message)
_CAUSAL_GGUF = {"llama", "mistral", "qwen2", "qwen2moe", "qwen2_moe", "qwen3", "qwen3moe", "qwen3_moe", "qwen35",
                "qwen35moe", "falcon", "phi3", "bloom", "stablelm", "gpt2", "starcoder2", "mamba", "nemotron", "gemma2",
                "gemma3", "gemma4", "deci", "lfm2", "gpt_oss", "gpt-oss", "minimax_m2", "minimax-m2"}


def _require_gguf_reader() -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader for llama/qwen2/gemma3 reads through it)
    except ImportError as err:
        raise ModelError("importing a GGUF file needs the `gguf` package: pip install 'dsft[gguf]' "
                         "(or just `pip install gguf`)") from err


def _detach_gguf_quantizer(model) -> None:
    """transformers keeps its GGUF quantizer on the model and refuses save_pretrained; the weights are plain tensors
    once dequantized, so drop the quantizer and its config entry (what a safetensors checkpoint of them would hold)."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def _probe_logits(model, tok):
    import torch

    ids = tok("头痛怎么办? Headache after 3 days, 体温38.5℃。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids, model(input_ids=ids).logits.float()


def _dequantize_into(src: Path, tmp: Path, header: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Load the GGUF through transformers (dequantized), save model + tokenizer + template; return check numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.model.load import torch_dtype
    from dsft.model.tokenizer import probe_tokenizer

    kw = {"gguf_file": src.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch_dtype(dtype), **kw).eval()
    except Exception as err:  # transformers raises many types for files it cannot map
        raise ModelError(f"{src}: transformers cannot load this GGUF ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    probe_tokenizer(tok, str(src))
    template = header.get("chat_template")
    if isinstance(template, str) and template.strip():
        tok.chat_template = template  # the file's own template wins over whatever the conversion guessed
    _detach_gguf_quantizer(model)
    ids, before = _probe_logits(model, tok)
    model.config.name_or_path = str(src)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    mtype = model.config.model_type
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch_dtype(dtype), use_safetensors=True).eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits.float()
    return {"model_type": mtype, "n_params": n_params, "reload_max_abs_diff": float((after - before).abs().max()),
            "chat_template": "gguf metadata" if tok.chat_template and template else
                             ("tokenizer conversion" if tok.chat_template else None)}


def import_gguf(src: str | Path, out_dir: str | Path, *, dtype: str = "float32", force: bool = False,
                sha256: str | None = None) -> dict[str, Any]:
    """Dequantize a GGUF file into `out_dir` (safetensors, tokenizer, chat template, provenance note); return the note."""
    src, out_dir = Path(src).expanduser().resolve(), Path(out_dir).expanduser()
    if not src.is_file():
        raise ModelError(f"{src}: GGUF file not found")
    header = read_gguf_header(src)
    check_importable(src, header)
    _require_gguf_reader()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise OverwriteError(f"{out_dir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        checks = _dequantize_into(src, tmp, header, dtype)
        stat = src.stat()
        note = {"source": str(src), "sha256": sha256 or sha256_file(src), "size_bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "architecture": header["architecture"], "name": header["name"],
                "quant_type": header["file_type"], "tensor_types": header["tensor_types"], "dtype": dtype,
                "tested_in_dsft": header["architecture"] in TESTED_ARCHS, **checks,
                "transformers": _version("transformers"), "seconds": round(time.perf_counter() - t0, 1),
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / PROVENANCE).write_text(json.dumps(note, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return note


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def cache_root() -> Path:
    return dsft_home() / "models" / "gguf"


def _cached(src: Path, match) -> Path | None:
    root = cache_root()
    for note_file in sorted(root.glob(f"*/{PROVENANCE}")) if root.exists() else []:
        try:
            note = json.loads(note_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if match(note) and any(note_file.parent.glob("*.safetensors")):
            return note_file.parent
    return None


def resolve_gguf(path: str | Path) -> Path:
    """`model.name_or_path: file.gguf` → its imported folder under $DSFT_HOME/models/gguf (imported on first use)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise ModelError(f"{src}: GGUF file not found")
    stat = src.stat()
    hit = _cached(src, lambda n: n.get("source") == str(src) and n.get("size_bytes") == stat.st_size
                  and n.get("mtime_ns") == stat.st_mtime_ns)
    if hit:
        return hit
    digest = sha256_file(src)
    hit = _cached(src, lambda n: n.get("sha256") == digest)
    if hit:
        return hit
    dest = cache_root() / f"{src.stem}-{digest[:12]}"
    log.info("importing %s into %s (dequantized once, then cached)", src, dest)
    import_gguf(src, dest, sha256=digest, force=True)
    return dest


def is_gguf_path(name_or_path: str) -> bool:
    """A reference to a GGUF file (by suffix), as `model.name_or_path` may give one."""
    return str(name_or_path).lower().endswith(".gguf")
