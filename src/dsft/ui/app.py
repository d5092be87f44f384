"""The dashboard's FastAPI app: the pages (pages.py) and the JSON API (api.py) over one runs folder, behind Guard.

Every route is a module-level handler listed in ROUTES; the state one dashboard shares (runs folder, jobs, chat
servers, templates) is a `UiState` on `app.state.ui`, which handlers receive through the `Ui` dependency (state.py).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from dsft.ui import api, pages
from dsft.ui.chat import ChatServers
from dsft.ui.jobs import Jobs
from dsft.ui.paths import NotFound, UiError
from dsft.ui.security import Guard
from dsft.ui.state import UiState

STATIC_DIR = Path(__file__).parent / "static"

# the whole URL map: (path, module-level handler, method)
ROUTES = [
    ("/", pages.runs_page, "GET"),
    ("/runs/{name}", pages.run_page, "GET"),
    ("/new", pages.new_page, "GET"),
    ("/compare", pages.compare_page, "GET"),
    ("/chat", pages.chat_page, "GET"),
    ("/runs/{name}/files/{rel:path}", pages.run_artifact, "GET"),
    ("/api/runs", api.api_runs, "GET"),
    ("/api/runs/{name}", api.api_run, "GET"),
    ("/api/runs/{name}/log", api.api_log, "GET"),
    ("/api/runs/{name}/events", api.api_events, "GET"),
    ("/api/validate", api.api_validate, "POST"),
    ("/api/runs", api.api_create, "POST"),
    ("/api/runs/{name}/stop", api.api_stop, "POST"),
    ("/api/runs/{name}/resume", api.api_resume, "POST"),
    ("/api/chat", api.api_chat, "POST"),
    ("/api/chat/stop", api.api_chat_stop, "POST"),
]


@asynccontextmanager
async def lifespan(app: FastAPI):
    """At shutdown, stop the chat servers: they belong to the dashboard (training runs go on)."""
    yield
    await asyncio.to_thread(app.state.ui.servers.stop_all)


async def ui_error(request: Request, err: UiError) -> Response:
    """A refused request: 404 for a missing run or file, else 400; JSON under /api/, the error page elsewhere."""
    code = 404 if isinstance(err, NotFound) else 400
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": str(err)}, code)
    return pages.render(request, "error.html", status_code=code, message=str(err))


def create_app(runs_dir: str | Path, *, token: str | None = None, loopback: bool = True,
               stop_grace_s: float | None = None) -> FastAPI:
    """The dashboard over `runs_dir` (created if missing). token: required on every request when given."""
    root = Path(runs_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    jobs = Jobs(root, **({"stop_grace_s": stop_grace_s} if stop_grace_s is not None else {}))
    app = FastAPI(title="dsft ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = UiState(runs_root=root, jobs=jobs, servers=ChatServers(), templates=pages.templates())
    app.add_middleware(Guard, token=token, loopback=loopback)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.add_exception_handler(UiError, ui_error)
    for path, handler, method in ROUTES:  # response_model=None: the return annotations document, never convert
        app.add_api_route(path, handler, methods=[method], response_model=None)
    return app

