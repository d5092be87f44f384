"""Bounded load test on loopback: 200 requests at concurrency 8 → 0 errors, batching used, flat memory."""

from __future__ import annotations

import asyncio
import gc
import re

import httpx
import psutil

from dsft.serve.engine import Sequence


async def _fire(url: str, n: int, concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    bodies = [
        ("/generate", {"prompt": "头痛怎么办", "max_tokens": 8}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "发烧三天"}], "max_tokens": 8}),
        ("/v1/completions", {"model": "tiny", "prompt": "胃疼的原因", "max_tokens": 8}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "咳嗽"}], "max_tokens": 8,
                                  "stream": True}),
    ]
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(i: int) -> int:
            path, body = bodies[i % len(bodies)]
            async with sem:
                r = await c.post(f"{url}{path}", json=body)
                if body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]")
                else:
                    assert r.json()
                return r.status_code

        return await asyncio.gather(*[one(i) for i in range(n)])


def _metric(url, name):
    return float(re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_200_requests_concurrency_8_no_errors_flat_memory(server):
    proc = psutil.Process()
    codes = asyncio.run(_fire(server, 40, 8))  # warm-up
    assert set(codes) == {200}
    gc.collect()
    rss0 = proc.memory_info().rss
    before = _metric(server, 'dsft_requests_total{path="/generate",status="200"}')
    steps0 = _metric(server, "dsft_decode_steps")
    codes = asyncio.run(_fire(server, 200, 8))
    gc.collect()
    rss1 = proc.memory_info().rss
    assert codes.count(200) == 200, sorted(set(codes))
    assert _metric(server, 'dsft_requests_total{path="/generate",status="200"}') - before == 50
    # forward passes were shared: 200 requests × ≤ 7 decode steps each needed far fewer than 1400 passes
    assert _metric(server, "dsft_peak_batch_rows") >= 4
    assert _metric(server, "dsft_decode_steps") - steps0 < 0.5 * 200 * 7
    grown_mb = (rss1 - rss0) / 2**20
    print(f"RSS growth over 200 requests: {grown_mb:.1f} MiB")
    assert grown_mb < 10, f"RSS grew {grown_mb:.1f} MiB over 200 requests"
    # nothing per request survives: no Sequence objects (they hold token lists and callbacks) and an idle engine
    assert sum(type(o) is Sequence for o in gc.get_objects()) == 0
    assert _metric(server, "dsft_running_requests") == 0 and _metric(server, "dsft_queue_depth") == 0
