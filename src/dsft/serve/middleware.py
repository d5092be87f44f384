"""The server's front door (pure ASGI, streaming-safe): count every answer, then auth, then the body-size limit.

Runs before routing and before a byte of the body is read, so an unauthenticated request gets 401 whatever
its body holds, and a body announced over the limit gets 413 unread.
"""

from __future__ import annotations

import json
from typing import Any

from dsft.serve.errors import error_body
from dsft.serve.state import ServerState

MAX_BODY_BYTES = 16 * 2**20
COUNTED_PATHS = frozenset({"/generate", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions",
                           "/v1/completions"})  # /v1/models/<id> and the rest count as "other" (bounded labels)


async def send_json(send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    """Counts responses by path and status; answers 401 (no/wrong key) and 413 (announced body too large)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in COUNTED_PATHS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        headers = dict(scope.get("headers") or [])
        if not self.state.authorized(path, headers.get(b"authorization", b"").decode("latin-1")):
            return await send_json(counted_send, 401, error_body(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'"),
                [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await send_json(counted_send, 413, error_body(
                413, f"request body over {MAX_BODY_BYTES // 2**20} MiB"))
        await self.app(scope, receive, counted_send)
