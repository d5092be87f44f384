"""`dsft serve` in the foreground: uvicorn until SIGTERM/SIGINT, a graceful drain, and a meaningful exit status.

Exit statuses: 0 after a signal once every in-flight request has finished (what Kubernetes and systemd expect
of a clean stop); 1 when the drain took longer than serve.shutdown_timeout_s (or a second Ctrl-C forced it)
and requests were cut; 2 when the model cannot be served (one line on stderr).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from dsft.config import ServeConfig
from dsft.errors import ServeError

EXIT_DRAINED, EXIT_CUT = 0, 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a caught signal is not re-raised after the drain (so the exit status is
    ours, not 143) and the drain is bounded by drain_timeout_s, after which the server stops waiting."""

    def __init__(self, config: uvicorn.Config, *, drain_timeout_s: float):
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self.drain_timed_out = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.drain_timeout_s, self._drain_expired)
            timer.daemon = True
            timer.start()
        elif sig == signal.SIGINT:  # a second Ctrl-C: stop waiting now
            self.drain_timed_out = True
        super().handle_exit(sig, frame)

    def _drain_expired(self) -> None:
        if not self.force_exit and self.started:
            self.drain_timed_out = True
            self.force_exit = True

    @property
    def exit_status(self) -> int:
        return EXIT_CUT if self.drain_timed_out else EXIT_DRAINED


def serve_forever(model: str, cfg: ServeConfig) -> int:
    """Run uvicorn in the foreground until SIGINT/SIGTERM (in-flight requests finish first); the exit status."""
    from dsft.serve.app import create_app
    from dsft.serve.background import bind_socket, check_model
    from dsft.serve.settings import check_adapters

    model_dir = check_model(model, cfg.engine)
    check_adapters(cfg.lora_modules)
    sock = bind_socket(cfg.host, cfg.port, fallback_free=cfg.port == 0)
    host, port = sock.getsockname()[:2]
    app = create_app(str(model_dir), cfg)
    print(f"dsft serve: {model_dir} as '{app.state.dsft.model_id}' on http://{host}:{port} "
          f"(health: /health, OpenAI API: /v1, metrics: /metrics)", flush=True)
    # uvicorn waits for open requests without its own limit; DrainingServer bounds the wait
    server = DrainingServer(uvicorn.Config(app, log_level="info", lifespan="on"),
                            drain_timeout_s=cfg.shutdown_timeout_s)
    state = app.state.dsft

    def watch_load() -> None:  # a model that cannot load ends the process (exit 2), not a pod stuck at 503
        state.ready.wait()
        if state.load_error:
            server.should_exit = True
        else:
            print(f"dsft serve: model loaded, ready on http://{host}:{port}", flush=True)

    threading.Thread(target=watch_load, name="dsft-load-watch", daemon=True).start()
    server.run(sockets=[sock])
    if state.load_error:
        raise ServeError(f"{model_dir}: {state.load_error}")
    if server.drain_timed_out:
        print(f"dsft serve: stopped before every request finished (shutdown timeout "
              f"{cfg.shutdown_timeout_s:g} s); exit {EXIT_CUT}", flush=True)
    return server.exit_status
