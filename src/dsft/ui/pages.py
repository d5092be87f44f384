"""The dashboard's server-rendered pages (Jinja2 templates and their filters): runs, a run, new, compare, chat."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from dsft.ui import forms, runs, views
from dsft.ui.paths import UiError, run_file, run_path
from dsft.ui.state import Ui, ui_state

TEMPLATES_DIR = Path(__file__).parent / "templates"
TEXT_SUFFIXES = (".md", ".txt", ".jsonl", ".yaml", ".log")  # run files served as UTF-8 text


def fmt_time(ts: Any) -> str:
    """A Unix time as 'YYYY-MM-DD HH:MM' (local), "—" when missing."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(ts, int | float) else "—"


def fmt_num(x: Any, digits: int = 4) -> str:
    """A number for a table cell: ints with thousands separators, floats to `digits` (scientific when tiny/huge)."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def templates() -> Jinja2Templates:
    """The page templates with the dashboard's filters (bytes, when, num)."""
    t = Jinja2Templates(directory=str(TEMPLATES_DIR))
    t.env.filters.update(bytes=views.human_bytes, when=fmt_time, num=fmt_num)
    return t


def render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    """Template `name` rendered with `ctx` (and the runs folder every page shows)."""
    ui = ui_state(request)
    return ui.templates.TemplateResponse(request, name, {"runs_root": str(ui.runs_root), **ctx},
                                         status_code=status_code)


async def runs_page(request: Request, ui: Ui) -> HTMLResponse:
    rows = await asyncio.to_thread(runs.list_runs, ui.runs_root, ui.jobs.states())
    return render(request, "runs.html", runs=rows)


async def run_page(request: Request, name: str, ui: Ui) -> HTMLResponse:
    rd = run_path(ui.runs_root, name)
    summary = runs.summary(rd, ui.jobs.state(name))
    view = await asyncio.to_thread(views.run_view, rd)
    return render(request, "run.html", run=summary, v=view, job=ui.jobs.state(name))


async def new_page(request: Request) -> HTMLResponse:
    values = forms.form_defaults()
    raw, _ = forms.config_from_form(values)
    return render(request, "new.html", fields=forms.FORM_FIELDS, values=values, yaml_text=forms.to_yaml(raw))


async def compare_page(request: Request, ui: Ui) -> HTMLResponse:
    names = request.query_params.getlist("run")
    if len(names) < 2:
        raise UiError("compare: pick two or more runs (…/compare?run=A&run=B)")
    dirs = [run_path(ui.runs_root, n) for n in names]
    return render(request, "compare.html", c=await asyncio.to_thread(views.compare_view, dirs))


async def chat_page(request: Request, ui: Ui) -> HTMLResponse:
    rows = [r for r in runs.list_runs(ui.runs_root, ui.jobs.states()) if {"export", "train"} & set(r["stages"])]
    return render(request, "chat.html", runs=rows, selected=request.query_params.get("run"))


async def run_artifact(name: str, rel: str, ui: Ui) -> FileResponse:
    p = run_file(ui.runs_root, name, rel)
    return FileResponse(p, media_type="text/plain; charset=utf-8" if p.suffix in TEXT_SUFFIXES else None)
