"""FastAPI app: the seed's /generate plus the OpenAI-compatible API, vLLM's error contract, auth and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsft.config import ServeConfig
from dsft.serve.engine import (
    BASE_ADAPTER,
    Engine,
    EngineOverloaded,
    EngineStopped,
    Event,
    SamplingParams,
    Sequence,
)
from dsft.serve.metrics import Metrics
from dsft.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from dsft.serve.reasoning import ReasoningStream, split_reasoning

log = logging.getLogger("dsft.serve")

API_KEY_ENV = "DSFT_API_KEY"
MAX_BODY_BYTES = 16 * 2**20
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
          413: "RequestTooLarge", 429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An error answered with the vLLM/OpenAI envelope {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError"),
                      "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class ServerState:
    """What the routes share: the engine (None while loading), names, auth key, metrics."""

    def __init__(self, model_dir: str, cfg: ServeConfig, engine: Engine | None = None):
        self.model_dir = model_dir
        self.cfg = cfg
        self.engine = engine
        self.load_error: str | None = None
        p = Path(str(model_dir))
        self.model_id = cfg.served_model_name or (p.stem if p.suffix == ".gguf" else p.name) or "model"
        self.adapters = dict(cfg.lora_modules)
        self.created = int(time.time())
        self.api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.metrics = Metrics(self)
        self.ready = threading.Event()
        if engine is not None:
            self.ready.set()

    def load(self) -> None:
        """Load the model and start the engine (run in a thread so /health can answer 503 meanwhile)."""
        from dsft.serve.engine import load_engine

        common = dict(chat_template=self.cfg.chat_template, max_queue=self.cfg.max_queue,
                      max_model_len=self.cfg.max_model_len, on_token=self.metrics.on_tokens,
                      on_first_token=self.metrics.ttft.observe)
        try:
            if self.cfg.engine == "llamacpp":
                from dsft.serve.llamacpp import load_llamacpp_engine

                if self.adapters:
                    raise ValueError("LoRA adapters need the transformers engine (merge them before GGUF export)")
                eng = load_llamacpp_engine(self.model_dir, **common)
            else:
                eng = load_engine(self.model_dir, adapters=self.adapters, dtype=self.cfg.dtype,
                                  max_batch_size=self.cfg.max_batch_size, **common)
            eng.start()
            self.engine = eng
        except Exception as err:  # reported by /health and by serve_in_background
            self.load_error = f"{type(err).__name__}: {err}" if not getattr(err, "exit_code", None) else str(err)
            log.error("model load failed: %s", self.load_error)
        finally:
            self.ready.set()


def _check_auth(state: ServerState, request: Request) -> None:
    if not state.api_key:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})


def _engine(state: ServerState) -> Engine:
    if state.engine is None:
        msg = f"model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise ApiError(503, msg, headers={"Retry-After": "5"})
    return state.engine


def _adapter_for(state: ServerState, model: str | None) -> str:
    if model is None or model == state.model_id:
        return BASE_ADAPTER
    if model in state.adapters:
        return model
    raise ApiError(404, f"The model `{model}` does not exist.", param="model")


def _render_chat(eng: Engine, msgs: list[dict[str, Any]], *, param: str = "messages") -> tuple[str, list[int]]:
    """Apply the chat template; a conversation the template rejects is the client's mistake (400)."""
    try:
        text = eng.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja raise_exception (role order, missing fields …)
        raise ApiError(400, f"{param}: the chat template rejected the conversation ({err})", param=param) from err
    return text, eng.tok(text, add_special_tokens=False)["input_ids"]


def _params(eng: Engine, prompt_ids: list[int], max_tokens: int | None, *, temperature: float, top_p: float,
            seed: int | None, stop: list[str], clamp: bool = False, prompt_param: str = "messages") -> SamplingParams:
    n = len(prompt_ids)
    ctx = eng.max_model_len
    if n >= ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has {n} tokens. "
                            f"Please reduce the length of the prompt.", param=prompt_param)
    room = ctx - n
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        if not clamp:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the completion). "
                                f"Please reduce the length of the messages or completion.", param="max_tokens")
        max_tokens = room
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)


class _Run:
    """One submitted sequence and its event queue on the event loop."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, adapter: str):
        eng = _engine(state)
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

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if ev.kind in ("finish", "error"):
                    return
        finally:
            if not self.seq.done:
                self.seq.cancel()

    async def collect(self, request: Request) -> tuple[str, Event]:
        """Wait for the whole completion; cancel it if the client goes away."""
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
                    self.seq.cancel()
                    task.cancel()
                    self.state.metrics.cancelled.inc()
                    raise ApiError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
        assert last is not None
        if last.kind == "error":
            raise ApiError(500, last.text)
        return "".join(parts), last


class _CountRequests:
    """Pure ASGI middleware counting responses by path and status (streaming-safe)."""

    _PATHS = {"/generate", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    # /v1/models/<id> is counted as "other" (ids would make the label set unbounded)

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in self._PATHS else "other"
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            self.metrics.requests.labels(path, "413").inc()
            body = json.dumps({"error": {"message": f"request body over {MAX_BODY_BYTES // 2**20} MiB",
                                         "type": "RequestTooLarge", "param": None, "code": 413}}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def _send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, _send)


def _usage(ev: Event) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model_dir: str, cfg: ServeConfig | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the app; the model loads in a background thread when the app starts (unless an engine is given)."""
    cfg = cfg or ServeConfig()
    state = ServerState(str(model_dir), cfg, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load, name="dsft-load", daemon=True).start()
        yield
        if state.engine is not None:  # graceful: uvicorn already waited for open requests; finish any leftovers
            await asyncio.to_thread(state.engine.stop, drain=True, timeout=cfg.shutdown_timeout_s)

    app = FastAPI(title="dsft server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dsft = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    # ---- errors: vLLM's envelope, 4xx for every client mistake ---------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('msg')}", None)
        # drop pydantic's union-member tags (e.g. 'str', 'list[str]') from the field path
        loc = [x for x in loc if not (x.startswith(("list[", "function-")) or x in ("str", "int", "float", "bool"))]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        if param is None:
            return error_response(400, f"request body must be a JSON object ({msg})", None)
        return error_response(400, f"{param}: {msg}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), None, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("internal error")
        return error_response(500, f"internal server error: {type(err).__name__}")

    # ---- health and metrics ---------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, ctype = state.metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    # ---- seed API -------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        _check_auth(state, request)
        eng = _engine(state)
        adapter = _adapter_for(state, body.model)
        _, ids = _render_chat(eng, [{"role": "user", "content": body.prompt}], param="prompt")
        params = _params(eng, ids, body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                         stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []), clamp=True,
                         prompt_param="prompt")
        run = _Run(state, ids, params, adapter)
        text, last = await run.collect(request)
        state.metrics.observe("generate", run.t0)
        return {"text": text, "finish_reason": last.finish_reason, "usage": _usage(last)}

    # ---- OpenAI-compatible API ------------------------------------------------------------------
    def model_cards() -> list[dict[str, Any]]:
        ctx = state.engine.max_model_len if state.engine is not None else None
        base = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "dsft",
                "root": state.model_dir, "parent": None, "max_model_len": ctx}
        return [base] + [{"id": name, "object": "model", "created": state.created, "owned_by": "dsft", "root": path,
                          "parent": state.model_id, "max_model_len": ctx} for name, path in state.adapters.items()]

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(state, request)
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _check_auth(state, request)
        for card in model_cards():
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_auth(state, request)
        eng = _engine(state)
        adapter = _adapter_for(state, body.model)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        prompt_text, ids = _render_chat(eng, msgs)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _params(eng, ids, max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                         stop=body.stop_list())
        think_open = prompt_text.rstrip().endswith("<think>")
        run = _Run(state, ids, params, adapter)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_id
        if not body.stream:
            text, last = await run.collect(request)
            state.metrics.observe("chat", run.t0)
            reasoning, content = split_reasoning(text, think_open)
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": last.finish_reason}],
                    "usage": _usage(last)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def stream() -> AsyncIterator[str]:
            rs = ReasoningStream(think_open)
            yield chunk({"role": "assistant", "content": ""})
            async for ev in run.events():
                if ev.kind == "error":
                    yield _sse({"error": {"message": ev.text, "type": "InternalServerError", "param": None, "code": 500}})
                    break
                if ev.kind == "delta":
                    for field, text in rs.feed(ev.text):
                        yield chunk({field: text})
                    continue
                for field, text in rs.flush():
                    yield chunk({field: text})
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": _usage(ev)})
                state.metrics.observe("chat", run.t0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_auth(state, request)
        eng = _engine(state)
        adapter = _adapter_for(state, body.model)
        if isinstance(body.prompt, str):
            prompt_text, ids = body.prompt, eng.encode_text(body.prompt)
        elif isinstance(body.prompt[0], str):
            prompt_text, ids = body.prompt[0], eng.encode_text(body.prompt[0])
        else:
            ids = [int(x) for x in body.prompt]
            if any(x < 0 or x >= len(eng.tok) for x in ids):
                raise ApiError(400, "prompt: token id out of the vocabulary", param="prompt")
            prompt_text = eng.tok.decode(ids)
        params = _params(eng, ids, body.max_tokens if body.max_tokens is not None else 16, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, stop=body.stop_list(), prompt_param="prompt")
        run = _Run(state, ids, params, adapter)
        cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or state.model_id
        prefix = prompt_text if body.echo else ""
        if not body.stream:
            text, last = await run.collect(request)
            state.metrics.observe("completions", run.t0)
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": last.finish_reason}],
                    "usage": _usage(last)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str, finish: str | None = None) -> str:
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

        async def stream() -> AsyncIterator[str]:
            if prefix:
                yield chunk(prefix)
            async for ev in run.events():
                if ev.kind == "error":
                    yield _sse({"error": {"message": ev.text, "type": "InternalServerError", "param": None, "code": 500}})
                    break
                if ev.kind == "delta":
                    yield chunk(ev.text)
                    continue
                yield chunk("", ev.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                                "choices": [], "usage": _usage(ev)})
                state.metrics.observe("completions", run.t0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
