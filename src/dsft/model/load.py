"""Load a local causal LM + tokenizer safely: safetensors only, no remote code unless asked, no hub."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from dsft.config import EMBEDDED_MODEL, ModelConfig
from dsft.errors import ModelError
from dsft.model.base_checkpoint import describe as describe_checkpoint
from dsft.model.base_checkpoint import read_base_checkpoint
from dsft.model.gguf_import import is_gguf_path, resolve_gguf
from dsft.model.tokenizer import load_tokenizer

# What dsft's own tests train, merge and serve: DeepSeek V2/V3 (MLA + MoE) and the dense Llama/Qwen shapes of
# DeepSeek-LLM/Coder and R1-Distill, plus Gemma-3 (text), imported from GGUF in tests/model/test_gguf_import.py.
# Any other causal LM built into transformers loads too, with a one-line note that dsft has not tested it.
TESTED_TYPES = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "qwen2", "qwen3", "mistral",
                "gemma3_text"}
SUPPORTED_TYPES = TESTED_TYPES  # the old name, kept for callers
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(name_or_path: str) -> Path:
    """Map `embedded:…`, a local folder or a .gguf file to a checked folder; explain hub ids and missing weights."""
    if name_or_path == EMBEDDED_MODEL:
        from dsft.model.tiny import embedded_model_dir

        return embedded_model_dir()
    if is_gguf_path(name_or_path):  # a GGUF file: dequantized once into the dsft cache (dsft.model.gguf_import)
        return resolve_gguf(name_or_path)
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


def builtin_causal_lm_types() -> set[str]:
    """model_types whose causal-LM class ships inside the installed transformers (no remote code needed)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def remote_code_files(model_dir: Path) -> list[str]:
    """The folder's own modelling code: `auto_map` entries in config.json whose .py file is present."""
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and "." in r]
    files = {r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs}  # "repo--module.Class" → module.py
    return sorted(f for f in files if (Path(model_dir) / f).is_file())


def check_architecture(model_dir: Path, *, trust_remote_code: bool = False) -> str:
    """Accept transformers' built-in causal LMs (noting untested ones); remote code only when asked and present."""
    import transformers

    mtype = model_type_of(model_dir)
    code = remote_code_files(model_dir)
    if trust_remote_code and code:
        log.info("%s: model_type '%s' runs the folder's own code (%s): trust_remote_code is on", model_dir, mtype, ", ".join(code))
        return mtype
    if mtype in builtin_causal_lm_types():
        if mtype not in TESTED_TYPES:
            log.info("note: model_type '%s' is built into transformers %s but untested in dsft (tested: DeepSeek V2/V3/"
                     "V3.2/V4, Llama/Qwen2/Qwen3/Mistral-shape distills, Gemma-3 text)", mtype, transformers.__version__)
        return mtype
    if code:
        raise ModelError(f"{model_dir}: model_type '{mtype}' is not built into transformers {transformers.__version__}; "
                         f"the folder ships its own code ({', '.join(code)}): set model.trust_remote_code: true only if you trust it")
    raise ModelError(f"{model_dir}: model_type '{mtype}' is not a causal LM built into transformers {transformers.__version__} "
                     f"and the folder ships no modelling code (no auto_map with .py files); upgrade transformers or check config.json")


def torch_dtype(name: str):
    import torch

    # "fp8" names a storage format (an FP8 export or DeepSeek's shipped checkpoint): its weights stay e4m3 and are
    # dequantized per module into the compute dtype, which is the same choice as "auto"
    if name in ("auto", "fp8"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    known = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in known:
        raise ModelError(f"dtype {name!r}: expected one of auto, fp8, {', '.join(known)}")
    return known[name]


def load_model(model_dir: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", device_map=None):
    """Load a causal LM from a checked local folder (safetensors only)."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(str(model_dir))
    check_architecture(model_dir, trust_remote_code=trust_remote_code)
    ckpt = read_base_checkpoint(model_dir)
    if ckpt and ckpt["format"] == "fp8":  # DeepSeek's shipped FP8: kept e4m3, dequantized per module (fp8_load.py)
        return load_fp8_base(model_dir, ckpt, dtype=dtype, attn_implementation=attn_implementation)
    try:
        with mtp_layers_ignored(model_dir, ckpt):
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation, device_map=device_map,
            )
    except Exception as err:
        raise ModelError(f"{model_dir}: cannot load the model ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    return model


# ---------------------------------------------------------------- shipped DeepSeek checkpoints: FP8 and MTP layers
def load_fp8_base(model_dir: Path, ckpt: dict, *, dtype: str, attn_implementation: str):
    """A shipped FP8 folder: FP8 linears stay e4m3 + scales (dsft.model.fp8_load); the MTP layers stay on disk."""
    from dsft.model.fp8_load import load_fp8_model

    try:
        model = load_fp8_model(model_dir, ckpt, dtype=torch_dtype(dtype), attn_implementation=attn_implementation)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"{model_dir}: cannot load the FP8 checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
    log.info("%s: %s", model_dir, describe_checkpoint(ckpt))
    return model


@contextlib.contextmanager
def mtp_layers_ignored(model_dir: Path, ckpt: dict | None) -> Iterator[None]:
    """transformers ignores only V3's `model.layers.61.*` as MTP; ignore this folder's MTP layers (kept on disk) too."""
    if not ckpt or not ckpt["mtp_prefixes"]:
        yield
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type_of(model_dir), ""), None)
    if cls is None:
        yield
        return
    orig = cls._keys_to_ignore_on_load_unexpected
    cls._keys_to_ignore_on_load_unexpected = [*(orig or []), *(re.escape(p) + ".*" for p in ckpt["mtp_prefixes"])]
    try:
        yield
    finally:
        cls._keys_to_ignore_on_load_unexpected = orig


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
