"""The published OpenAPI document: request and response schemas, every status each route sends, and auth.

The routes parse their own bodies (off the event loop, after the auth check), so FastAPI cannot infer the
document; it is written here from one table, and tests/serve/test_serve_fuzz.py holds the server to it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dsft.serve import protocol, responses
from dsft.serve.errors import ErrorEnvelope

REF = "#/components/schemas/{model}"
WHY = {400: "bad request: names the field (`param`)", 401: "missing or wrong API key",
       404: "unknown model", 413: "request body over the limit", 429: "queue full: retry after `Retry-After` s",
       500: "the engine failed on this request (other requests go on)",
       503: "model still loading, failed to load, or server shutting down"}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503)

# (method, path) → (request body model or None, 200 answer, error statuses)
OPERATIONS: dict[tuple[str, str], tuple[type[BaseModel] | None, Any, tuple[int, ...]]] = {
    ("get", "/health"): (None, responses.Health, (503,)),
    ("get", "/metrics"): (None, "text/plain", ()),
    ("post", "/generate"): (protocol.GenerateRequest, responses.GenerateResponse, GENERATION_ERRORS),
    ("get", "/v1/models"): (None, responses.ModelList, (401,)),
    ("get", "/v1/models/{model_id}"): (None, responses.ModelCard, (401, 404)),
    ("post", "/v1/chat/completions"): (protocol.ChatCompletionRequest, responses.ChatCompletion, GENERATION_ERRORS),
    ("post", "/v1/completions"): (protocol.CompletionRequest, responses.Completion, GENERATION_ERRORS),
}
STREAMING = {"/v1/chat/completions", "/v1/completions"}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a JSON chunk (`chat.completion.chunk` / `text_completion`, the last one with "
                                     "`usage` when asked), `{\"error\": …}` if generation fails, then `[DONE]`"}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(path: str, ok: Any, errors: tuple[int, ...]) -> dict[str, Any]:
    if ok == "text/plain":
        out: dict[str, Any] = {"200": {"description": "Prometheus text format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}
    else:
        content = _json(_ref(ok))
        if path in STREAMING:  # (OpenAPI 3.1: `schema` describes one event)
            content["text/event-stream"] = {"schema": SSE_EVENT}
        out = {"200": {"description": "OK", "content": content}}
    for status in errors:
        schema = _ref(responses.Health) if (path, status) == ("/health", 503) else _ref(ErrorEnvelope)
        out[str(status)] = {"description": WHY[status], "content": _json(schema)}
    return out


def build_openapi(app: FastAPI, *, open_paths: frozenset[str], auth: bool) -> dict[str, Any]:
    """The document for this app (open_paths: routes answered without the key; auth: a key is configured)."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="dsft serve: the seed's POST /generate and an OpenAI-compatible API. Errors use "
                                  "vLLM's envelope {\"error\": {message, type, param, code}}.")
    models = [m for m, _, _ in OPERATIONS.values() if m is not None]
    models += [ok for _, ok, _ in OPERATIONS.values() if isinstance(ok, type)] + [ErrorEnvelope]
    _, top = models_json_schema([(m, "validation") for m in dict.fromkeys(models)], ref_template=REF)
    doc["components"] = {"schemas": top.get("$defs", {})}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for (method, path), (body, ok, errors) in OPERATIONS.items():
        op = doc["paths"][path][method]
        errs = tuple(e for e in errors if e != 401 or (auth and path not in open_paths))
        if auth and path not in open_paths and 401 not in errs:
            errs = (401, *errs)
        op["responses"] = _responses(path, ok, errs)
        if body is not None:
            op["requestBody"] = {"required": True, "content": _json(_ref(body))}
        if auth:
            op["security"] = [] if path in open_paths else [{"bearer": []}]
    return doc
