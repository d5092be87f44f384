"""Run the server in a background thread on loopback (free port if needed): used by the demo and tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dsft.config import ServeConfig
from dsft.errors import ServeError


def bind_socket(host: str, port: int, *, fallback_free: bool = True) -> socket.socket:
    """A listening-ready bound socket on host:port; a busy port (or 0) falls back to a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        if not fallback_free:
            sock.close()
            raise ServeError(f"cannot bind {host}:{port} ({err.strerror}); choose another --port") from err
        sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock


def check_model(model: str, engine: str) -> str:
    """A checked model path: a .gguf file for llamacpp, else a Hugging Face folder (or embedded:…)."""
    if engine == "llamacpp":
        from dsft.serve.llamacpp import check_gguf

        return str(check_gguf(model))
    import json
    from pathlib import Path

    from dsft.model.load import resolve_model_dir

    ad = Path(model).expanduser() / "adapter_config.json"
    if ad.is_file() and not (ad.parent / "config.json").is_file():
        try:
            base = json.loads(ad.read_text(encoding="utf-8")).get("base_model_name_or_path") or "BASE"
        except ValueError:
            base = "BASE"
        raise ServeError(f"{ad.parent} is a LoRA adapter, not a model: serve it over its base with "
                         f"--model {base} --lora NAME={ad.parent} (or merge it first: dsft export)")
    return str(resolve_model_dir(model))


def _url(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}"


@contextmanager
def serve_in_background(model_dir: str, serve_cfg: ServeConfig | None = None) -> Iterator[str]:
    """Start uvicorn with the dsft app, wait for /health 200, yield the base URL, then shut down gracefully."""
    import httpx
    import uvicorn

    from dsft.serve.app import create_app
    from dsft.serve.settings import check_adapters

    cfg = serve_cfg or ServeConfig()
    if cfg.engine == "vllm":
        raise ServeError("serve_in_background runs the transformers or llamacpp engine (serve.engine='vllm' is a "
                         "separate process: `dsft serve --engine vllm`)")
    model_dir = check_model(str(model_dir), cfg.engine)  # a missing folder or weights: one line, before any thread
    check_adapters(cfg.lora_modules)
    host = cfg.host
    sock = bind_socket(host, cfg.port)
    port = sock.getsockname()[1]
    app = create_app(model_dir, cfg)
    state = app.state.dsft
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=int(cfg.shutdown_timeout_s)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsft-uvicorn", daemon=True)
    thread.start()
    url = _url(host, port)
    auth = {"Authorization": f"Bearer {state.api_key}"} if state.api_key else {}  # /health may need it (auth_all)
    try:
        deadline = time.monotonic() + cfg.startup_timeout_s
        while True:
            if state.load_error:
                raise ServeError(f"server for {model_dir} failed to start: {state.load_error}")
            if not thread.is_alive():
                raise ServeError(f"server for {model_dir} exited during startup (port {port})")
            if time.monotonic() > deadline:
                raise ServeError(f"server for {model_dir} not healthy after {cfg.startup_timeout_s:.0f} s")
            if server.started and state.engine is not None:
                try:
                    if httpx.get(f"{url}/health", headers=auth, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(cfg.shutdown_timeout_s + 10)
        if state.engine is not None:
            state.engine.stop(drain=False, timeout=5)
        sock.close()
