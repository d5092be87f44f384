"""FastAPI app: the seed's /generate plus the OpenAI-compatible API, vLLM's error contract, auth and metrics.

Every route is a module-level handler that finds the server's shared state at `request.app.state.dsft`.
Order of work for a request: RequestGate (count, 401, 413 by Content-Length) → the handler reads the body
(413 past the limit) and validates it in a worker thread (400 naming the field) → prompt rendering and
tokenization in a worker thread (400 for lengths and ids) → the engine. The event loop never does the heavy
part, so /health answers while a 16 MiB body is being processed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from dsft.config import ServeConfig
from dsft.serve.engine import Engine, Event
from dsft.serve.errors import ApiError, error_body, error_response
from dsft.serve.middleware import MAX_BODY_BYTES, RequestGate
from dsft.serve.openapi import build_openapi
from dsft.serve.prompts import chat_prompt, completion_prompt, decode, run_off_loop, sampling_params
from dsft.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from dsft.serve.reasoning import ReasoningStream, split_reasoning
from dsft.serve.runs import Run
from dsft.serve.state import ServerState

log = logging.getLogger("dsft.serve")
B = TypeVar("B", bound=BaseModel)
_UNION_TAGS = ("str", "int", "float", "bool")


def _state(request: Request) -> ServerState:
    return request.app.state.dsft


# ---- request bodies ------------------------------------------------------------------------------
def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(one-line message, field path) for pydantic errors: the most specific one, union-member tags dropped."""
    if not errors:
        return "request body must be a JSON object (invalid request)", None
    # a failed union reports every member: prefer the member that matched the type (e.g. a list of 17 stops)
    first = min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")[:200]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {msg}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = [x for x in loc if not ("[" in x or x.startswith(("function-", "constrained-")) or x in _UNION_TAGS)]
    param = ".".join(loc) or None
    if param is None:
        return f"request body must be a JSON object ({msg})", None
    return f"{param}: {msg}", param


async def parse_body(request: Request, model: type[B]) -> B:
    """Read the body (413 past the limit, also without Content-Length) and validate it off the event loop."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB")
        chunks.append(chunk)
    try:
        return await run_off_loop(model.model_validate_json, b"".join(chunks))
    except ValidationError as err:
        message, param = describe_validation_error(err.errors())
        raise ApiError(400, message, param=param) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ApiError(400, f"request body is not valid JSON ({str(err)[:200]})") from None


# ---- responses -----------------------------------------------------------------------------------
def _usage(ev: Event) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _meta(prefix: str, obj: str, state: ServerState, model: str | None) -> dict[str, Any]:
    """The fields every answer and chunk of one completion share (chunks override `object`)."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": model or state.model_id}


# ---- health and metrics --------------------------------------------------------------------------
async def health(request: Request) -> Response:
    state = _state(request)
    if state.engine is not None:
        return JSONResponse({"status": "ok"})
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


async def metrics(request: Request) -> Response:
    body, ctype = _state(request).metrics.render()
    return PlainTextResponse(body, media_type=ctype)


# ---- the seed's API ------------------------------------------------------------------------------
async def generate(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, GenerateRequest)
    eng = state.engine_or_503()
    adapter = state.adapter_for(body.model)
    _, ids = await run_off_loop(chat_prompt, eng, [{"role": "user", "content": body.prompt}], param="prompt")
    params = sampling_params(eng, len(ids), body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                             seed=body.seed, stop=body.stop_list(), clamp=True, prompt_param="prompt")
    run = Run(state, ids, params, adapter)
    text, last = await run.collect(request)
    state.metrics.observe("generate", run.t0)
    return JSONResponse({"text": text, "finish_reason": last.finish_reason, "usage": _usage(last)})


# ---- OpenAI-compatible API -----------------------------------------------------------------------
async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _state(request).model_cards()})


async def model_card(request: Request, model_id: str) -> Response:
    for card in _state(request).model_cards():
        if card["id"] == model_id:
            return JSONResponse(card)
    raise ApiError(404, f"The model `{model_id[:200]}` does not exist.", param="model")


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, ChatCompletionRequest)
    eng = state.engine_or_503()
    adapter = state.adapter_for(body.model)
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompt_text, ids = await run_off_loop(chat_prompt, eng, msgs)
    params = sampling_params(eng, len(ids), body.max_completion_tokens or body.max_tokens,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop_list())
    think_open = prompt_text[-64:].rstrip().endswith("<think>")
    run = Run(state, ids, params, adapter)
    meta = _meta("chatcmpl", "chat.completion", state, body.model)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _event_stream(_chat_chunks(run, state, meta, think_open, usage))
    text, last = await run.collect(request)
    state.metrics.observe("chat", run.t0)
    reasoning, content = split_reasoning(text, think_open)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return JSONResponse({**meta, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                              "finish_reason": last.finish_reason}], "usage": _usage(last)})


async def _chat_chunks(run: Run, state: ServerState, meta: dict[str, Any], think_open: bool,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse({**meta, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    rs = ReasoningStream(think_open)
    yield chunk({"role": "assistant", "content": ""})
    async for ev in run.events():
        if ev.kind == "error":
            yield _sse(error_body(500, ev.text))
            break
        if ev.kind == "delta":
            for field, text in rs.feed(ev.text):
                yield chunk({field: text})
            continue
        for field, text in rs.flush():
            yield chunk({field: text})
        yield chunk({}, ev.finish_reason)
        if include_usage:
            yield _sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ev)})
        state.metrics.observe("chat", run.t0)
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, CompletionRequest)
    eng = state.engine_or_503()
    adapter = state.adapter_for(body.model)
    ids = await run_off_loop(completion_prompt, eng, body.prompt)
    params = sampling_params(eng, len(ids), body.max_tokens if body.max_tokens is not None else 16,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop_list(),
                             prompt_param="prompt")
    prefix = ""
    if body.echo:
        given = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        prefix = given if isinstance(given, str) else await run_off_loop(decode, eng, ids)
    run = Run(state, ids, params, adapter)
    meta = _meta("cmpl", "text_completion", state, body.model)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _event_stream(_completion_chunks(run, state, meta, prefix, usage))
    text, last = await run.collect(request)
    state.metrics.observe("completions", run.t0)
    return JSONResponse({**meta, "choices": [{"index": 0, "text": prefix + text, "logprobs": None,
                                              "finish_reason": last.finish_reason}], "usage": _usage(last)})


async def _completion_chunks(run: Run, state: ServerState, meta: dict[str, Any], prefix: str,
                             include_usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return _sse({**meta, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    if prefix:
        yield chunk(prefix)
    async for ev in run.events():
        if ev.kind == "error":
            yield _sse(error_body(500, ev.text))
            break
        if ev.kind == "delta":
            yield chunk(ev.text)
            continue
        yield chunk("", ev.finish_reason)
        if include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(ev)})
        state.metrics.observe("completions", run.t0)
    yield "data: [DONE]\n\n"


# ---- errors: vLLM's envelope, 4xx for every client mistake --------------------------------------
async def _api_error(request: Request, err: ApiError) -> Response:
    return error_response(err.status, err.message, err.param, err.headers)


async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    message, param = describe_validation_error(list(err.errors()))
    return error_response(400, message, param)


async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    return error_response(err.status_code, str(err.detail), None, getattr(err, "headers", None))


async def _server_error(request: Request, err: Exception) -> Response:
    log.exception("internal error")
    return error_response(500, f"internal server error: {type(err).__name__}")


# ---- the app -------------------------------------------------------------------------------------
ROUTES = [
    ("/health", health, "GET"),
    ("/metrics", metrics, "GET"),
    ("/generate", generate, "POST"),
    ("/v1/models", list_models, "GET"),
    ("/v1/models/{model_id:path}", model_card, "GET"),
    ("/v1/chat/completions", chat_completions, "POST"),
    ("/v1/completions", completions, "POST"),
]


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load the model in a thread at startup (unless an engine was given); drain the engine at shutdown."""
    state: ServerState = app.state.dsft
    if state.engine is None:
        threading.Thread(target=state.load, name="dsft-load", daemon=True).start()
    yield
    if state.engine is not None:  # uvicorn already waited for open requests; finish any leftovers
        await asyncio.to_thread(state.engine.stop, drain=True, timeout=state.cfg.shutdown_timeout_s)


def create_app(model_dir: str, cfg: ServeConfig | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the app; the model loads in a background thread when the app starts (unless an engine is given)."""
    state = ServerState(str(model_dir), cfg or ServeConfig(), engine)
    app = FastAPI(title="dsft server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dsft = state
    app.add_middleware(RequestGate, state=state)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    for path, handler, method in ROUTES:
        app.add_api_route(path, handler, methods=[method])

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, open_paths=state.open_paths, auth=bool(state.api_key))
        return app.openapi_schema

    app.openapi = openapi
    return app
