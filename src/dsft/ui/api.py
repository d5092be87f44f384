"""The dashboard's JSON API: runs, their logs (polled or as Server-Sent Events), launch/stop/resume, the chat proxy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsft.ui import chat, forms, runs
from dsft.ui.jobs import dsft_argv, resume_commands
from dsft.ui.paths import UI_DIR, UiError, check_run_name, run_path
from dsft.ui.state import Ui, UiState, json_body

SSE_POLL_S = 0.5
SSE_HEARTBEAT_S = 15.0


# ---------------------------------------------------------------- runs and their logs
async def api_runs(ui: Ui) -> list[dict[str, Any]]:
    return await asyncio.to_thread(runs.list_runs, ui.runs_root, ui.jobs.states())


async def api_run(name: str, ui: Ui) -> dict[str, Any]:
    rd = run_path(ui.runs_root, name)
    return {**runs.summary(rd, ui.jobs.state(name)), "job": ui.jobs.state(name)}


async def api_log(name: str, ui: Ui, start: int = 0) -> dict[str, Any]:
    recs, nxt = runs.read_log(run_path(ui.runs_root, name), max(0, start))
    return {"records": recs, "next": nxt}


async def api_events(request: Request, name: str, ui: Ui, start: int = 0) -> StreamingResponse:
    rd = run_path(ui.runs_root, name)
    last = request.headers.get("last-event-id", "")
    pos = int(last) if last.isdigit() else max(0, start)
    return StreamingResponse(log_events(request, ui, rd, name, pos), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def log_events(request: Request, ui: UiState, rd: Path, name: str, pos: int) -> AsyncIterator[str]:
    """log.jsonl lines as SSE events (id = line number, so a reconnect resumes), status changes, then end."""
    status, beat, offset = None, time.monotonic(), None
    while not await request.is_disconnected():
        recs, nxt, offset_next, reset = await asyncio.to_thread(runs.follow_log, rd, pos, offset)
        if reset:  # a resumed run rewrote log.jsonl from its checkpoint: the client starts its curves again
            pos, offset = 0, None
            yield "event: reset\ndata: {}\n\n"
            continue
        for i, rec in enumerate(recs):
            yield f"id: {pos + i + 1}\ndata: {json.dumps(rec)}\n\n"
        pos, offset = nxt, offset_next
        s = runs.status(rd, runs.manifests(rd), ui.jobs.state(name))
        if s != status:
            status = s
            stages = list(runs.manifests(rd))
            yield f"event: status\ndata: {json.dumps({'status': status, 'stages': stages})}\n\n"
        if not recs and status not in ("running", "stopping"):
            yield "event: end\ndata: {}\n\n"
            return
        if time.monotonic() - beat > SSE_HEARTBEAT_S:
            beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)


# ---------------------------------------------------------------- validate, launch, stop, resume
async def api_validate(request: Request) -> dict[str, Any]:
    body = await json_body(request)
    if "yaml" in body:
        _, errors = forms.validate_yaml(str(body["yaml"]))
        return {"ok": not errors, "errors": errors}
    raw, errors = forms.config_from_form(body.get("form") or {})
    return {"ok": not errors, "errors": errors, "yaml": forms.to_yaml(raw)}


async def api_create(request: Request, ui: Ui) -> JSONResponse:
    body = await json_body(request)
    name = body.get("name")
    if "yaml" in body:
        raw, errs = forms.validate_yaml(str(body["yaml"]))
        errors: dict[str, Any] = {"yaml": errs} if errs else {}
    else:
        raw, field_errors = forms.config_from_form(body.get("form") or {})
        errors = dict(field_errors)
    if (name_error := forms.check_name(name, ui.runs_root)) is not None:
        errors["name"] = name_error
    if errors:
        return JSONResponse({"ok": False, "errors": errors}, 422)
    rd = run_path(ui.runs_root, check_run_name(name), must_exist=False)
    (rd / UI_DIR).mkdir(parents=True)
    raw = {**raw, "run_dir": str(rd)}
    cfg_path = rd / UI_DIR / "config.yaml"
    cfg_path.write_text(forms.to_yaml(raw), encoding="utf-8")
    ui.jobs.start(name, [dsft_argv("run", str(cfg_path), "--run-dir", str(rd))], action="start")
    return JSONResponse({"ok": True, "name": name, "url": f"/runs/{name}"}, 201)


async def api_stop(name: str, ui: Ui) -> dict[str, Any]:
    run_path(ui.runs_root, name)
    return {"ok": True, "job": ui.jobs.stop(name)}


async def api_resume(name: str, ui: Ui) -> dict[str, Any]:
    rd = run_path(ui.runs_root, name)
    cfg_path = rd / UI_DIR / "config.yaml"
    if not cfg_path.is_file():
        raise UiError(f"run {name!r} was not launched from the dashboard (no {UI_DIR}/config.yaml): resume it "
                      f"with `dsft train CONFIG --run-dir {rd} --resume auto`")
    return {"ok": True, "job": ui.jobs.start(name, resume_commands(rd, cfg_path), action="resume")}


# ---------------------------------------------------------------- chat
async def chat_target(ui: UiState, body: dict[str, Any]) -> tuple[str, dict[str, str], str]:
    """(base URL ending in /v1, headers, model) of the chat: a run's own server, or the URL and key given."""
    if body.get("run"):
        srv = await asyncio.to_thread(ui.servers.get, run_path(ui.runs_root, str(body["run"])))
        return f"{srv.base_url}/v1", srv.headers, srv.model_id or ""
    base = chat.check_base_url(str(body.get("base_url") or ""))
    headers = {"Authorization": f"Bearer {body['api_key']}"} if body.get("api_key") else {}
    model = str(body.get("model") or "")
    if not model:
        try:
            model = (await chat.list_models(base, headers) or [""])[0]
        except Exception as err:  # noqa: BLE001 (any upstream failure is one line to the user)
            raise UiError(f"{base}/models: {type(err).__name__}: {err}; name the model") from err
    return base, headers, model


async def api_chat(request: Request, ui: Ui) -> StreamingResponse:
    body = await json_body(request)
    base, headers, model = await chat_target(ui, body)
    req = chat.chat_body(body, model)
    return StreamingResponse(chat.stream_chat(base, headers, req), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Dsft-Model": model})


async def api_chat_stop(request: Request, ui: Ui) -> dict[str, Any]:
    body = await json_body(request)
    name = check_run_name(str(body.get("run") or ""))
    return {"ok": await asyncio.to_thread(ui.servers.stop, name)}
