"""vLLM OpenAI-server arguments equivalent to a dsft serve configuration (shared: serve, deploy, eval and doctor use them).

Mapping (dsft → vLLM):
    --model DIR                 → --model DIR
    --host / --port             → --host / --port            (port 0 is not supported by vLLM)
    --api-key / $DSFT_API_KEY   → --api-key                   (vLLM also reads $VLLM_API_KEY)
    --served-model-name         → --served-model-name
    --max-batch-size            → --max-num-seqs
    --max-model-len             → --max-model-len
    --dtype                     → --dtype
    --lora NAME=DIR …           → --enable-lora --lora-modules NAME=DIR … --max-loras N --max-lora-rank R
    --chat-template NAME        → --chat-template FILE        (the named DeepSeek template written to a file)
    --tensor-parallel-size      → --tensor-parallel-size
    --gpu-memory-utilization    → --gpu-memory-utilization     (GPU only; on CPU vLLM reads it as a share of RAM)
    (CPU build of vLLM)         → --kv-cache-memory-bytes 4G   (unless $VLLM_CPU_KVCACHE_SPACE is set)
    R1-style template (<think>) → --reasoning-parser deepseek_r1 (vLLM ≥0.11 answers `reasoning`, dsft
                                  `reasoning_content`); only when the tokenizer has <think> and </think> as
                                  tokens: vLLM's parser refuses to start otherwise
    the seed's POST /generate   → --middleware dsft.serve.seed_compat.SeedGenerateMiddleware
                                  (rewrites it to /v1/chat/completions; dsft must be importable by vLLM's Python)
    --max-queue                 → (no vLLM equivalent: vLLM queues without bound; scale on
                                   vllm:num_requests_waiting instead)

Imports neither vLLM nor torch (deploy writes these arguments into manifests on machines without either).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from dsft.config import ServeConfig
from dsft.errors import ServeError
from dsft.model.adapters import lora_rank

log = logging.getLogger("dsft.serve")

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
SEED_MIDDLEWARE = "dsft.serve.seed_compat.SeedGenerateMiddleware"
# vLLM accepts only these --max-lora-rank values; an adapter's r is rounded up to the next one
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# KV cache of vLLM's CPU build when $VLLM_CPU_KVCACHE_SPACE is not set (its own default would reserve
# --gpu-memory-utilization × total RAM, 90 % by default)
CPU_KV_CACHE = "4G"
THINK_TOKENS = ("<think>", "</think>")


def vllm_max_lora_rank(rank: int) -> int:
    """The --max-lora-rank vLLM accepts for an adapter of this rank (the next allowed value up)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def _has_think_tokens(model: str) -> bool:
    """<think> and </think> are single tokens of the model's tokenizer (what vLLM's R1 parser needs)."""
    try:
        tj = json.loads((Path(model) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # no tokenizer.json to look at (slow tokenizer, remote id): let vLLM decide
    names = {t.get("content") for t in tj.get("added_tokens") or []}
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        names.update(vocab)
    return all(t in names for t in THINK_TOKENS)


def _uses_think(model: str, chat_template: str | None) -> bool:
    if chat_template:  # a template name (deepseek-r1, r1-distill-*, deepseek-v3.1-thinking) or a Jinja text
        return "r1" in chat_template or "thinking" in chat_template or "<think>" in chat_template
    try:  # transformers ≥4.45 saves the template beside tokenizer_config.json, older ones inside it
        return "<think>" in (Path(model) / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        pass
    try:
        cfg = json.loads((Path(model) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "<think>" in str(cfg.get("chat_template") or "")


def vllm_chat_template(model: str, chat_template: str | None) -> str | None:
    """The chat template vLLM renders for this model: the named DeepSeek template dsft writes to the --chat-template
    file, else the model folder's own (chat_template.jinja, then tokenizer_config.json), or None if it has none.
    vLLM renders it through the tokenizer's apply_chat_template and tokenizes without adding special tokens."""
    if chat_template:
        from dsft.model.templates import get_template

        return get_template(chat_template)
    try:
        return (Path(model) / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        pass
    try:
        cfg = json.loads((Path(model) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tpl = cfg.get("chat_template")
    return tpl if isinstance(tpl, str) else None


def vllm_args(model: str, cfg: ServeConfig, *, template_file: str | None = None, device: str = "cuda",
              env: dict[str, str] | None = None) -> list[str]:
    """vLLM api_server arguments equivalent to a dsft serve configuration (without the API key).

    device: what vLLM runs on ('cpu' for vLLM's CPU build: KV cache sized in bytes, no GPU memory share)."""
    if cfg.port == 0:
        raise ServeError("--engine vllm needs a fixed --port (vLLM cannot pick a free port)")
    env = os.environ if env is None else env
    args = ["--model", str(model), "--host", cfg.host, "--port", str(cfg.port),
            "--max-num-seqs", str(cfg.max_batch_size), "--dtype", cfg.dtype,
            "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if device == "cpu":
        if not env.get("VLLM_CPU_KVCACHE_SPACE"):
            args += ["--kv-cache-memory-bytes", CPU_KV_CACHE]
    else:
        args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    args += ["--served-model-name", cfg.served_model_name or Path(str(model)).name]
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.lora_modules:
        ranks = [r for r in (lora_rank(p) for p in cfg.lora_modules.values()) if r]
        args += ["--enable-lora", "--max-loras", str(len(cfg.lora_modules))]
        if ranks:
            args += ["--max-lora-rank", str(vllm_max_lora_rank(max(ranks)))]
        args += ["--lora-modules", *[f"{n}={p}" for n, p in cfg.lora_modules.items()]]
    if template_file:
        args += ["--chat-template", template_file]
    if _uses_think(str(model), cfg.chat_template):
        if _has_think_tokens(str(model)):
            args += ["--reasoning-parser", "deepseek_r1"]
        else:
            log.warning("%s: the tokenizer has no <think>/</think> tokens, so vLLM's deepseek_r1 reasoning parser "
                        "cannot run; answers keep <think>…</think> in `content`", model)
    args += ["--middleware", SEED_MIDDLEWARE]
    return args


def vllm_command(model: str, cfg: ServeConfig, *, template_file: str | None = None, device: str = "cuda",
                 env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", VLLM_MODULE,
            *vllm_args(model, cfg, template_file=template_file, device=device, env=env)]
