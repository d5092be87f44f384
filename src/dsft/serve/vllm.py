"""`dsft serve --engine vllm`: hand over to vLLM's OpenAI server with dsft's flags mapped (GPU, or vLLM's CPU build).

vLLM serves the same API as dsft (/v1/chat/completions, /v1/completions, /v1/models with LoRA `parent`,
/health, /metrics, the same error envelope), so clients do not change. The flag mapping is
`dsft.model.vllm_args`. Tested on vLLM's CPU build (`make test-vllm`: tests/serve/test_serve_vllm.py, tiny
Llama/Qwen2 on loopback); the GPU path (tensor parallel, GPU memory) is not run here. `--dry-run` prints the
command.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import tempfile
from pathlib import Path

from dsft.config import ServeConfig
from dsft.errors import ServeError
from dsft.model.vllm_args import vllm_command


def vllm_device() -> str | None:
    """The device vLLM would run on here ('cuda', 'cpu', …), or None when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.platforms import current_platform  # ~3 s: vLLM probes the platform on first access

    return str(current_platform.device_type or "") or None


def exec_vllm(model: str, cfg: ServeConfig, *, dry_run: bool = False) -> int:
    """Replace this process with vLLM's OpenAI server (or print the command with --dry-run)."""
    template_file = None
    if cfg.chat_template:
        from dsft.model.templates import get_template

        fd, template_file = tempfile.mkstemp(prefix="dsft-template-", suffix=".jinja")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(get_template(cfg.chat_template))
    device = vllm_device()
    cmd = vllm_command(model, cfg, template_file=template_file, device=device or "cuda")
    if dry_run:
        print(shlex.join(cmd))
        return 0
    if device is None:
        raise ServeError("--engine vllm: vLLM is not installed (GPU + Linux: pip install 'dsft[vllm]'; "
                         "CPU: vLLM's CPU build, see docs/serve.md)")
    key = cfg.api_key or os.environ.get("DSFT_API_KEY")
    env = dict(os.environ)
    from dsft.serve.seed_compat import MODEL_ENV

    env[MODEL_ENV] = cfg.served_model_name or Path(str(model)).name
    if key:
        env["VLLM_API_KEY"] = key  # not on the command line: it would show in `ps`
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover
