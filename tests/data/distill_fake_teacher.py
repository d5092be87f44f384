"""A fake OpenAI-compatible teacher for the distill tests: a real HTTP server on loopback (threads) whose replies
a test scripts per (prompt, sample, attempt) — slow, 429 with Retry-After, 500, reasoning_content or <think>."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], dict[str, Any]]


def chat(content: str, reasoning: str | None = None, finish: str = "stop", usage: tuple[int, int] = (10, 20)
         ) -> dict[str, Any]:
    """A chat.completion body (reasoning_content when given, as DeepSeek's API and dsft serve answer)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


class FakeTeacher:
    """`script(prompt, k, attempt) -> (status, headers, body)`; k is the request's `seed` (distill sends seed + k
    when teacher.seed is set). `log` holds (t, prompt, k, attempt, status) of every request."""

    def __init__(self, script: Callable[[str, int, int], Reply], delay_s: float = 0.0):
        self.script, self.delay_s = script, delay_s
        self.log: list[tuple[float, str, int, int, int]] = []
        self.auth: list[str | None] = []
        self.attempts: dict[tuple[str, int], int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def prompts_requested(self, since: float = 0.0) -> set[str]:
        return {p for t, p, *_ in self.log if t >= since}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt, k = body["messages"][-1]["content"], int(body.get("seed", 0))
                t0 = time.monotonic()
                with fake.lock:
                    fake.auth.append(self.headers.get("Authorization"))
                    attempt = fake.attempts.get((prompt, k), 0)
                    fake.attempts[(prompt, k)] = attempt + 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay_s)
                    status, headers, reply = fake.script(prompt, k, attempt)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                        fake.log.append((t0, prompt, k, attempt, status))
                data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
                try:
                    self.send_response(status)
                    for h, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(h, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed (the crash test)
                    pass

        return Handler
