"""Stage 'serve' of a run: start the real server on loopback for the exported model, ask it, stop it."""

from __future__ import annotations

import time
from typing import Any

from dsft.config import Config
from dsft.run import RunDir

PROMPT = "头痛、发烧三天，应该怎么办？"


def run(cfg: Config, run_dir: RunDir, *, force: bool = False) -> dict[str, Any]:
    """Serve export's merged model on loopback; send one /generate, one malformed request and one OpenAI chat
    request; stop the server (graceful). Writes serve/manifest.json; `ok` says all three behaved."""
    import httpx

    from dsft.serve.background import serve_in_background

    model_dir = run_dir.root / "export" / run_dir.read_manifest("export")["merged"]
    run_dir.prepare_stage("serve", force=force)
    t0 = time.perf_counter()
    with serve_in_background(str(model_dir), cfg.serve) as url:
        started = time.perf_counter() - t0
        gen = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0.7}, timeout=120)
        bad = httpx.post(f"{url}/generate", json={"prompt": 42}, timeout=60)
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32, "temperature": 0})
    body = gen.json() if gen.headers.get("content-type", "").startswith("application/json") else {}
    chat_body = chat.json() if chat.status_code == 200 else {}
    chat_text = ((chat_body.get("choices") or [{}])[0].get("message") or {}).get("content")
    manifest = {
        "ok": gen.status_code == 200 and isinstance(body.get("text"), str) and 400 <= bad.status_code < 500
        and isinstance(chat_text, str),
        "openai_chat_status": chat.status_code,
        "openai_chat_text": chat_text,
        "status": gen.status_code,
        "bad_request_status": bad.status_code,
        "prompt": PROMPT,
        "text": body.get("text"),
        "startup_s": round(started, 2),
        "model_dir": str(model_dir),
    }
    run_dir.write_manifest("serve", manifest)
    return manifest
