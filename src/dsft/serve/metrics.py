"""Prometheus metrics of the server (own registry per app): requests, latency, TTFT, tokens/s, queue, running."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters and histograms updated by the routes (latency) and the engine thread (tokens, TTFT)."""

    def __init__(self, state: Any):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsft_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("dsft_request_latency_seconds", "end-to-end latency of generation requests",
                                 ["endpoint"], buckets=_LAT_BUCKETS, registry=r)
        self.ttft = Histogram("dsft_time_to_first_token_seconds", "queue + prefill time until the first token",
                              buckets=_LAT_BUCKETS, registry=r)
        self.tokens = Counter("dsft_generation_tokens", "generated tokens", registry=r)
        self.rejected = Counter("dsft_rejected_requests", "requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter("dsft_cancelled_requests", "requests cancelled because the client went away", registry=r)
        tps = Gauge("dsft_generation_tokens_per_second", "generated tokens per second over the last 10 s", registry=r)
        queue = Gauge("dsft_queue_depth", "requests waiting for a batch slot", registry=r)
        running = Gauge("dsft_running_requests", "requests in the running batch", registry=r)
        peak = Gauge("dsft_peak_batch_rows", "most requests ever decoded in one forward pass", registry=r)
        steps = Gauge("dsft_decode_steps", "batched decode forward passes so far", registry=r)
        mixed = Gauge("dsft_mixed_adapter_batching", "1 if requests for different adapters share forward passes",
                      registry=r)
        mixed.set_function(lambda: 1 if state.engine is not None and state.engine.mixed else 0)
        peak.set_function(lambda: state.engine.max_rows_seen if state.engine is not None else 0)
        steps.set_function(lambda: state.engine.steps if state.engine is not None else 0)
        queue.set_function(lambda: state.engine.queue_depth if state.engine is not None else 0)
        running.set_function(lambda: state.engine.running if state.engine is not None else 0)
        tps.set_function(self._tokens_per_s)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def on_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, n))
            while self._window and self._window[0][0] < now - 10.0:
                self._window.popleft()

    def _tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - 10.0:
                self._window.popleft()
            return sum(n for _, n in self._window) / 10.0

    def observe(self, endpoint: str, t0: float) -> None:
        self.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
