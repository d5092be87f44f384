"""The dashboard's FastAPI app: server-rendered pages, a JSON API, SSE training logs and the chat proxy."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from dsft.ui import chat, forms, runs, views
from dsft.ui.jobs import Jobs, dsft_argv, resume_commands
from dsft.ui.paths import UI_DIR, NotFound, UiError, check_run_name, run_file, run_path
from dsft.ui.security import Guard

HERE = Path(__file__).parent
SSE_POLL_S = 0.5
SSE_HEARTBEAT_S = 15.0


def _fmt_time(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(ts, int | float) else "—"


def _fmt_num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(HERE / "templates"))
    t.env.filters.update(bytes=views.human_bytes, when=_fmt_time, num=_fmt_num)
    return t


def create_app(runs_dir: str | Path, *, token: str | None = None, loopback: bool = True,
               stop_grace_s: float | None = None) -> FastAPI:
    """The dashboard over `runs_dir` (created if missing). token: required on every request when given."""
    root = Path(runs_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    jobs = Jobs(root, **({"stop_grace_s": stop_grace_s} if stop_grace_s is not None else {}))
    servers = chat.ChatServers()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(servers.stop_all)  # chat servers belong to the dashboard; training runs go on

    app = FastAPI(title="dsft ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, token=token, loopback=loopback)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.runs_root, app.state.jobs, app.state.servers = root, jobs, servers
    tpl = templates()

    def page(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        return tpl.TemplateResponse(request, name, {"runs_root": str(root), **ctx}, status_code=status_code)

    @app.exception_handler(UiError)
    async def ui_error(request: Request, err: UiError):
        code = 404 if isinstance(err, NotFound) else 400
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(err)}, code)
        return page(request, "error.html", status_code=code, message=str(err))

    # ---------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request):
        rows = await asyncio.to_thread(runs.list_runs, root, jobs.states())
        return page(request, "runs.html", runs=rows)

    @app.get("/runs/{name}", response_class=HTMLResponse)
    async def run_page(request: Request, name: str):
        rd = run_path(root, name)
        summary = runs.summary(rd, jobs.state(name))
        view = await asyncio.to_thread(views.run_view, rd)
        return page(request, "run.html", run=summary, v=view, job=jobs.state(name))

    @app.get("/new", response_class=HTMLResponse)
    async def new_page(request: Request):
        values = forms.form_defaults()
        raw, _ = forms.config_from_form(values)
        return page(request, "new.html", fields=forms.FORM_FIELDS, values=values, yaml_text=forms.to_yaml(raw))

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request):
        names = request.query_params.getlist("run")
        if len(names) < 2:
            raise UiError("compare: pick two or more runs (…/compare?run=A&run=B)")
        dirs = [run_path(root, n) for n in names]
        return page(request, "compare.html", c=await asyncio.to_thread(views.compare_view, dirs))

    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page(request: Request):
        rows = [r for r in runs.list_runs(root, jobs.states()) if {"export", "train"} & set(r["stages"])]
        return page(request, "chat.html", runs=rows, selected=request.query_params.get("run"))

    @app.get("/runs/{name}/files/{rel:path}")
    async def run_artifact(name: str, rel: str):
        p = run_file(root, name, rel)
        media = "text/plain; charset=utf-8" if p.suffix in (".md", ".txt", ".jsonl", ".yaml", ".log") else None
        return FileResponse(p, media_type=media)

    # ---------------------------------------------------------------- JSON API
    @app.get("/api/runs")
    async def api_runs():
        return await asyncio.to_thread(runs.list_runs, root, jobs.states())

    @app.get("/api/runs/{name}")
    async def api_run(name: str):
        rd = run_path(root, name)
        return {**runs.summary(rd, jobs.state(name)), "job": jobs.state(name)}

    @app.get("/api/runs/{name}/log")
    async def api_log(name: str, start: int = 0):
        recs, nxt = runs.read_log(run_path(root, name), max(0, start))
        return {"records": recs, "next": nxt}

    @app.get("/api/runs/{name}/events")
    async def api_events(request: Request, name: str, start: int = 0):
        rd = run_path(root, name)
        last = request.headers.get("last-event-id", "")
        pos = int(last) if last.isdigit() else max(0, start)
        return StreamingResponse(_log_events(request, rd, name, pos), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _log_events(request: Request, rd: Path, name: str, pos: int):
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
            s = runs.status(rd, runs.manifests(rd), jobs.state(name))
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

    @app.post("/api/validate")
    async def api_validate(request: Request):
        body = await _json(request)
        if "yaml" in body:
            _, errors = forms.validate_yaml(str(body["yaml"]))
            return {"ok": not errors, "errors": errors}
        raw, errors = forms.config_from_form(body.get("form") or {})
        return {"ok": not errors, "errors": errors, "yaml": forms.to_yaml(raw)}

    @app.post("/api/runs")
    async def api_create(request: Request):
        body = await _json(request)
        name = body.get("name")
        if "yaml" in body:
            raw, errs = forms.validate_yaml(str(body["yaml"]))
            errors: dict[str, Any] = {"yaml": errs} if errs else {}
        else:
            raw, field_errors = forms.config_from_form(body.get("form") or {})
            errors = dict(field_errors)
        if (name_error := forms.check_name(name, root)) is not None:
            errors["name"] = name_error
        if errors:
            return JSONResponse({"ok": False, "errors": errors}, 422)
        rd = run_path(root, check_run_name(name), must_exist=False)
        (rd / UI_DIR).mkdir(parents=True)
        raw = {**raw, "run_dir": str(rd)}
        cfg_path = rd / UI_DIR / "config.yaml"
        cfg_path.write_text(forms.to_yaml(raw), encoding="utf-8")
        jobs.start(name, [dsft_argv("run", str(cfg_path), "--run-dir", str(rd))], action="start")
        return JSONResponse({"ok": True, "name": name, "url": f"/runs/{name}"}, 201)

    @app.post("/api/runs/{name}/stop")
    async def api_stop(name: str):
        run_path(root, name)
        return {"ok": True, "job": jobs.stop(name)}

    @app.post("/api/runs/{name}/resume")
    async def api_resume(name: str):
        rd = run_path(root, name)
        cfg_path = rd / UI_DIR / "config.yaml"
        if not cfg_path.is_file():
            raise UiError(f"run {name!r} was not launched from the dashboard (no {UI_DIR}/config.yaml): resume it "
                          f"with `dsft train CONFIG --run-dir {rd} --resume auto`")
        return {"ok": True, "job": jobs.start(name, resume_commands(rd, cfg_path), action="resume")}

    @app.post("/api/chat")
    async def api_chat(request: Request):
        body = await _json(request)
        if body.get("run"):
            srv = await asyncio.to_thread(servers.get, run_path(root, str(body["run"])))
            base, headers, model = f"{srv.base_url}/v1", srv.headers, srv.model_id or ""
        else:
            base = chat.check_base_url(str(body.get("base_url") or ""))
            headers = {"Authorization": f"Bearer {body['api_key']}"} if body.get("api_key") else {}
            model = str(body.get("model") or "")
            if not model:
                try:
                    model = (await chat.list_models(base, headers) or [""])[0]
                except Exception as err:  # noqa: BLE001 (any upstream failure is one line to the user)
                    raise UiError(f"{base}/models: {type(err).__name__}: {err}; name the model") from err
        req = chat.chat_body(body, model)
        return StreamingResponse(chat.stream_chat(base, headers, req), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Dsft-Model": model})

    @app.post("/api/chat/stop")
    async def api_chat_stop(request: Request):
        body = await _json(request)
        name = check_run_name(str(body.get("run") or ""))
        return {"ok": await asyncio.to_thread(servers.stop, name)}

    return app


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as err:
        raise UiError("request body: expected JSON") from err
    if not isinstance(body, dict):
        raise UiError("request body: expected a JSON object")
    return body
