"""The 'ui' stage entry points: serve the dashboard over a runs directory (blocking) until Ctrl-C."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import DsftError
from dsft.run import RunDir
from dsft.ui.security import is_loopback, new_token


def serve_dashboard(runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860,
                    token: str | None = None) -> dict[str, Any]:
    """Run uvicorn with the dashboard in the foreground; off loopback a token is always required."""
    import uvicorn

    from dsft.ui.app import create_app

    loopback = is_loopback(host)
    token = token or os.environ.get("DSFT_UI_TOKEN") or (None if loopback else new_token())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise DsftError(f"--host/--port: cannot bind {host}:{port} ({err.strerror}); choose another --port") from err
    sock.listen(2048)  # connections queue from now on, so the URL printed below answers at once
    bound_port = sock.getsockname()[1]
    app = create_app(runs_dir, token=token, loopback=loopback)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
    print(f"dsft ui: {app.state.ui.runs_root} on {url}" + ("" if loopback else "  (reachable from the network: keep "
                                                         "the token secret)"), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)).run(
        sockets=[sock])
    return {"runs": str(app.state.ui.runs_root), "url": url}


def run(cfg: Config, run_dir: RunDir, *, force: bool = False, **stage_options: Any) -> dict[str, Any]:
    """The stage contract: the dashboard over the folder that holds this run (options: host, port, token)."""
    return serve_dashboard(Path(run_dir.root).resolve().parent, **stage_options)
