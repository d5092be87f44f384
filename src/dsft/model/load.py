"""Load a local causal LM + tokenizer safely: safetensors only, no remote code unless asked, no hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dsft.config import EMBEDDED_MODEL, ModelConfig
from dsft.errors import ModelError
from dsft.model.tokenizer import load_tokenizer

SUPPORTED_TYPES = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "qwen2", "qwen3", "mistral"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(name_or_path: str) -> Path:
    """Map `embedded:…` or a local folder to a checked folder; explain hub ids and missing weights."""
    if name_or_path == EMBEDDED_MODEL:
        from dsft.model.tiny import embedded_model_dir

        return embedded_model_dir()
    p = Path(name_or_path).expanduser()
    if not p.exists():
        if _HUB_ID.match(name_or_path):
            raise ModelError(
                f"model '{name_or_path}' is a hub id, not a local folder: dsft never downloads at run time; "
                f"download it first (e.g. `hf download {name_or_path} --local-dir DIR`) and set model.name_or_path to DIR"
            )
        raise ModelError(f"model folder {p} not found")
    if not p.is_dir():
        raise ModelError(f"{p}: expected a Hugging Face model folder (config.json + *.safetensors), got a file")
    if not (p / "config.json").exists():
        raise ModelError(f"{p}: no config.json — expected a Hugging Face model folder")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise ModelError(f"{p}: only pickle weights (*.bin/*.pt) found; dsft loads safetensors only (convert them first)")
        raise ModelError(f"{p}: no *.safetensors weights found")
    return p


def model_type_of(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type", "?")


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(model_dir: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", device_map=None):
    """Load a causal LM from a checked local folder (safetensors only)."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(str(model_dir))
    mtype = model_type_of(model_dir)
    if mtype not in SUPPORTED_TYPES and not trust_remote_code:
        raise ModelError(f"{model_dir}: model_type '{mtype}' is not built into transformers here (supported: "
                         f"{', '.join(sorted(SUPPORTED_TYPES))}); set model.trust_remote_code: true only if you trust its code")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, device_map=device_map,
        )
    except Exception as err:
        raise ModelError(f"{model_dir}: cannot load the model ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    return model


def load_model_and_tokenizer(cfg: ModelConfig, *, model_dir: str | Path | None = None):
    """Load (model, tokenizer, model_dir) for a model config; the tokenizer is probed before use."""
    mdir = resolve_model_dir(str(model_dir or cfg.name_or_path))
    tok = load_tokenizer(cfg.tokenizer or str(mdir), trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
    if tok.chat_template is None:
        raise ModelError(f"{mdir}: the tokenizer has no chat template; set model.chat_template (one of deepseek-v3, "
                         f"deepseek-llm, deepseek-coder, r1-distill …)")
    model = load_model(mdir, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=cfg.attn_implementation)
    return model, tok, mdir
