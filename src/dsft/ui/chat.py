"""Chat playground backends: `dsft serve --run RUN` subprocesses on free loopback ports, and OpenAI-compatible URLs."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from dsft.ui.jobs import dsft_argv
from dsft.ui.paths import UI_DIR, UiError

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `dsft serve` process for one run, reachable only with its own random API key."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.port = free_port()
        self.key = secrets.token_urlsafe(16)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_id: str | None = None
        (run_dir / UI_DIR).mkdir(exist_ok=True)  # a run made by the CLI has no ui/ folder yet
        log = open(run_dir / UI_DIR / "serve.log", "a", encoding="utf-8")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen(
            dsft_argv("serve", "--run", str(run_dir), "--host", "127.0.0.1", "--port", str(self.port)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "DSFT_API_KEY": self.key, "PYTHONUNBUFFERED": "1"})
        log.close()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.run_dir / UI_DIR / "serve.log").read_text(encoding="utf-8", errors="replace")[-400:]
                raise UiError(f"dsft serve for {self.run_dir.name!r} exited with {self.proc.returncode}: "
                              f"{tail.strip().splitlines()[-1] if tail.strip() else 'no output'}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=10).json()["data"]
                    adapters = [m["id"] for m in models if m.get("parent")]  # a run served as base + its adapter
                    self.model_id = (adapters or [m["id"] for m in models])[0]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise UiError(f"dsft serve for {self.run_dir.name!r} did not become healthy within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ChatServers:
    """At most one server per run, started on first use and stopped with the dashboard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, Server] = {}

    def get(self, run_dir: Path) -> Server:
        name = run_dir.name
        with self._lock:
            srv = self._servers.get(name)
            if srv is not None and srv.proc.poll() is None:
                return srv
            if not ((run_dir / "export" / "manifest.json").is_file() or (run_dir / "train" / "manifest.json").is_file()):
                raise UiError(f"run {name!r} has no exported model or trained adapter yet")
            srv = self._servers[name] = Server(run_dir)
        try:
            srv.wait_ready()
        except UiError:
            with self._lock:
                self._servers.pop(name, None)
            raise
        return srv

    def stop(self, name: str) -> bool:
        with self._lock:
            srv = self._servers.pop(name, None)
        if srv:
            srv.stop()
        return srv is not None

    def stop_all(self) -> None:
        for name in list(self._servers):
            self.stop(name)


def check_base_url(url: str) -> str:
    """An OpenAI-compatible base URL the user names: http(s) only, no credentials in it."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise UiError(f"base URL {url!r}: expected http(s)://host[:port]/v1")
    return url.strip().rstrip("/")


def chat_body(req: dict[str, Any], model: str) -> dict[str, Any]:
    """The OpenAI request forwarded: messages and the few sampling settings the playground offers."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        raise UiError("messages: expected a list of {role: system|user|assistant, content: text}")
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    for key, kind in (("max_tokens", int), ("temperature", float), ("top_p", float)):
        if req.get(key) not in (None, ""):
            try:
                body[key] = kind(req[key])
            except (TypeError, ValueError) as err:
                raise UiError(f"{key}: expected a number, got {req[key]!r}") from err
    return body


async def stream_chat(base_url: str, headers: dict[str, str], body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The upstream's SSE bytes as they come; an upstream error becomes one `data: {"error": …}` event."""
    import json

    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
            async with client.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")
                    try:
                        msg = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = text[:300]
                    yield f"data: {json.dumps({'error': {'message': f'HTTP {r.status_code}: {msg}'}})}\n\n".encode()
                    return
                async for chunk in r.aiter_raw():
                    yield chunk
    except httpx.HTTPError as err:
        yield f"data: {json.dumps({'error': {'message': f'{type(err).__name__}: {err}'}})}\n\n".encode()


async def list_models(base_url: str, headers: dict[str, str]) -> list[str]:
    async with httpx.AsyncClient(timeout=15) as client:
        r = await client.get(f"{base_url}/models", headers=headers)
        r.raise_for_status()
        return [m["id"] for m in r.json().get("data", [])]
