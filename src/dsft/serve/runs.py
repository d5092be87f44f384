"""One request's sequence in the engine, seen from the event loop: its events, its result, its cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request

from dsft.serve.engine import EngineOverloaded, EngineStopped, Event, SamplingParams, Sequence
from dsft.serve.errors import ApiError
from dsft.serve.state import ServerState


class Run:
    """A submitted sequence and its event queue; cancelled (and counted once) when its client goes away."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, adapter: str):
        eng = state.engine_or_503()
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening any more
                self.seq.cancel()

        self.seq = Sequence(prompt_ids, params, emit=emit, adapter=adapter)
        self.state = state
        self.t0 = time.perf_counter()
        try:
            eng.submit(self.seq)
        except EngineOverloaded as err:
            state.metrics.rejected.inc()
            raise ApiError(429, f"server overloaded: {err}; retry later", headers={"Retry-After": "1"}) from err
        except EngineStopped as err:
            raise ApiError(503, str(err), headers={"Retry-After": "5"}) from err

    def cancel(self) -> None:
        """Stop generating for a client that went away (counted in dsft_cancelled_requests_total once)."""
        if not self.seq.done and not self.seq.cancelled:
            self.seq.cancel()
            self.state.metrics.cancelled.inc()

    async def events(self) -> AsyncIterator[Event]:
        """Deltas, then one finish or error; a consumer that stops early (disconnect) cancels the sequence."""
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if ev.kind in ("finish", "error"):
                    return
        finally:
            self.cancel()

    async def collect(self, request: Request) -> tuple[str, Event]:
        """Wait for the whole completion; cancel it if the client goes away; an engine failure is a 500."""
        parts: list[str] = []
        last: Event | None = None

        async def consume():
            nonlocal last
            async for ev in self.events():
                if ev.kind == "delta":
                    parts.append(ev.text)
                last = ev

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    break
                if await request.is_disconnected():
                    self.cancel()
                    raise ApiError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
        assert last is not None
        if last.kind == "error":
            raise ApiError(500, last.text)
        return "".join(parts), last
