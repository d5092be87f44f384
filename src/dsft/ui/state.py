"""The dashboard's shared state (runs folder, jobs, chat servers, templates) on `app.state.ui`, and its dependency."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from dsft.ui.chat import ChatServers
from dsft.ui.jobs import Jobs
from dsft.ui.paths import UiError


@dataclass
class UiState:
    """What every handler of one dashboard shares; two apps in one process never share it."""

    runs_root: Path
    jobs: Jobs
    servers: ChatServers
    templates: Jinja2Templates


def ui_state(request: Request) -> UiState:
    """The app's state (the route dependency)."""
    return request.app.state.ui


Ui = Annotated[UiState, Depends(ui_state)]


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or one UiError line (400)."""
    try:
        body = await request.json()
    except ValueError as err:
        raise UiError("request body: expected JSON") from err
    if not isinstance(body, dict):
        raise UiError("request body: expected a JSON object")
    return body
