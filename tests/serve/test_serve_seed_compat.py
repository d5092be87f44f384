"""The seed's /generate over an OpenAI-compatible backend (what `--engine vllm` adds to vLLM), on a live server."""

from __future__ import annotations

import threading

import httpx
import pytest
import uvicorn
from serve_helpers import wait_healthy

from dsft.config import ServeConfig
from dsft.serve.app import create_app
from dsft.serve.background import bind_socket
from dsft.serve.seed_compat import SeedGenerateMiddleware


@pytest.fixture(scope="module")
def wrapped(tiny_model_dir):
    """A real dsft app whose /generate is answered by the middleware through /v1/chat/completions."""
    app = create_app(str(tiny_model_dir), ServeConfig(served_model_name="tiny"))
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(SeedGenerateMiddleware(app, model="tiny"), log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(url, 120)
    yield url
    server.should_exit = True
    t.join(30)
    sock.close()


def test_generate_through_chat_equals_native_generate(wrapped, server):
    body = {"prompt": "头痛、发烧三天，应该怎么办？", "max_tokens": 12, "temperature": 0}
    via = httpx.post(f"{wrapped}/generate", json=body, timeout=60)
    native = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert via.status_code == 200 and via.json() == native.json()
    # requests were really rewritten: the backend counted chat completions, not /generate
    metrics = httpx.get(f"{wrapped}/metrics").text
    assert 'dsft_requests_total{path="/v1/chat/completions",status="200"}' in metrics
    assert 'path="/generate"' not in metrics


def test_bad_requests_and_backend_errors_keep_the_envelope(wrapped):
    r = httpx.post(f"{wrapped}/generate", json={"prompt": 42}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{wrapped}/generate", content=b"{oops", timeout=30)
    assert r.status_code == 400
    r = httpx.post(f"{wrapped}/generate", json={"prompt": "hi", "model": "nope"}, timeout=30)  # backend's 404
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = httpx.post(f"{wrapped}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"  # everything else passes through


def test_api_key_is_enforced_on_generate(tiny_model_dir):
    import asyncio

    app = SeedGenerateMiddleware(create_app(str(tiny_model_dir), ServeConfig()), model="tiny", api_key="k")

    async def call(headers):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/generate", json={"prompt": "hi"}, headers=headers)

    r = asyncio.run(call({}))
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    r = asyncio.run(call({"Authorization": "Bearer k"}))  # past auth; the backend is not loaded here → 503
    assert r.status_code == 503
