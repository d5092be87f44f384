"""The seed's `POST /generate` on top of any OpenAI-compatible server (vLLM): a pure ASGI middleware.

vLLM serves `/v1/*` but not the seed's `/generate`. `dsft serve --engine vllm` passes
`--middleware dsft.serve.seed_compat.SeedGenerateMiddleware` to vLLM, which wraps its app with this class:
`POST /generate {prompt, max_tokens=512, temperature=0.7, top_p, seed, stop}` is rewritten into a
`/v1/chat/completions` call (so the chat template applies) and the answer comes back as
`{"text", "finish_reason", "usage"}`; errors keep the backend's envelope and status. Imports no torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import ValidationError

from dsft.serve.protocol import GenerateRequest

MODEL_ENV = "DSFT_SERVED_MODEL_NAME"


def _json_response(status: int, obj: Any):
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers, body


class SeedGenerateMiddleware:
    """Answer `POST /generate` through the wrapped app's `/v1/chat/completions`; pass everything else through."""

    def __init__(self, app, model: str | None = None, api_key: str | None = None):
        self.app = app
        self.model = model or os.environ.get(MODEL_ENV) or None
        # enforced here too: depending on middleware order, vLLM's own key check may only see /v1 paths
        self.api_key = api_key or os.environ.get("VLLM_API_KEY") or os.environ.get("DSFT_API_KEY") or None

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("path") != "/generate" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        if self.api_key:
            import secrets

            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                status, headers, out = _json_response(401, {"error": {
                    "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    "type": "AuthenticationError", "param": None, "code": 401}})
                return await self._send(send, status, headers, out)
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            req = GenerateRequest.model_validate_json(body or b"{}")
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            status, headers, out = _json_response(400, {"error": {
                "message": f"{loc}: {e.get('msg')}" if loc else f"request body must be a JSON object ({e.get('msg')})",
                "type": "BadRequestError", "param": loc or None, "code": 400}})
            return await self._send(send, status, headers, out)
        chat: dict[str, Any] = {"messages": [{"role": "user", "content": req.prompt}], "max_tokens": req.max_tokens,
                                "temperature": req.temperature, "top_p": req.top_p}
        if req.model or self.model:
            chat["model"] = req.model or self.model
        if req.seed is not None:
            chat["seed"] = req.seed
        if req.stop:
            chat["stop"] = req.stop
        new_body = json.dumps(chat, ensure_ascii=False).encode("utf-8")
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(new_body)).encode())]
        inner = dict(scope, path="/v1/chat/completions", raw_path=b"/v1/chat/completions", headers=headers)
        sent = False

        async def inner_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        got: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

        async def capture(message):
            if message["type"] == "http.response.start":
                got["status"], got["headers"] = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                got["body"] += message.get("body", b"")

        await self.app(inner, inner_receive, capture)
        if got["status"] != 200:  # the backend's error envelope and status, unchanged
            hdrs = [(k, v) for k, v in got["headers"] if k.lower() != b"content-length"]
            hdrs.append((b"content-length", str(len(got["body"])).encode()))
            return await self._send(send, got["status"], hdrs, got["body"])
        data = json.loads(got["body"])
        choice = data["choices"][0]
        msg = choice["message"]
        text = msg.get("content") or ""
        # with --reasoning-parser vLLM splits R1 output at </think>: put it back together (dsft's /generate
        # returns the raw text); vLLM ≥0.11 calls the field `reasoning`, older ones `reasoning_content`
        reasoning = msg.get("reasoning") or msg.get("reasoning_content")
        if reasoning:
            text = reasoning + ("</think>" + text if msg.get("content") is not None else "")
        status, hdrs, out = _json_response(200, {"text": text,
                                                 "finish_reason": choice.get("finish_reason"),
                                                 "usage": data.get("usage")})
        return await self._send(send, status, hdrs, out)

    @staticmethod
    async def _send(send, status: int, headers, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
