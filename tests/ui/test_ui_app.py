"""The app's shape (issue 12): module-level route handlers, state per app on `app.state.ui`, short functions."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from dsft.ui.app import create_app
from dsft.ui.chat import ChatServers

UI_SRC = Path(__file__).resolve().parents[2] / "src" / "dsft" / "ui"
MAX_FUNCTION_LINES = 80


def _run(runs: Path, name: str, accuracy: float) -> None:
    (runs / name / "eval").mkdir(parents=True)
    (runs / name / "eval" / "manifest.json").write_text(json.dumps({"stage": "eval", "after": {"accuracy": accuracy}}))


def test_every_route_is_a_module_level_handler(tmp_path):
    routes = [r for r in create_app(tmp_path).routes if isinstance(r, APIRoute)]
    assert len(routes) == 16
    for r in routes:
        fn = r.endpoint
        assert "<locals>" not in fn.__qualname__, f"{r.path}: {fn.__qualname__} is a closure"
        assert fn.__module__.startswith("dsft.ui.")
        assert getattr(importlib.import_module(fn.__module__), fn.__name__) is fn, r.path


def test_no_function_in_the_ui_is_over_80_lines():
    long = []
    for path in sorted(UI_SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long


def test_two_dashboards_in_one_process_keep_their_own_runs(tmp_path):
    _run(tmp_path / "a", "run-a", 0.25)
    _run(tmp_path / "b", "run-b", 0.75)
    a = TestClient(create_app(tmp_path / "a"), base_url="http://127.0.0.1:7860")
    b = TestClient(create_app(tmp_path / "b"), base_url="http://127.0.0.1:7860")
    assert [r["name"] for r in a.get("/api/runs").json()] == ["run-a"]
    assert [r["name"] for r in b.get("/api/runs").json()] == ["run-b"]
    assert "run-a" in a.get("/").text and "run-b" not in a.get("/").text
    assert str(tmp_path / "b") in b.get("/").text  # every page names its own runs folder
    missing = a.get("/api/runs/run-b")
    assert missing.status_code == 404 and "run-b" in missing.json()["error"]
    page = a.get("/runs/run-b")  # the HTML error page, not JSON, outside /api/
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html") and "run-b" in page.text
    assert b.get("/runs/run-b").status_code == 200


class RecordingServers(ChatServers):
    """The real ChatServers, counting how often the dashboard stops them all."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = 0

    def stop_all(self) -> None:
        self.stopped += 1
        super().stop_all()


def test_the_chat_servers_stop_with_the_dashboard(tmp_path):
    app = create_app(tmp_path)
    servers = app.state.ui.servers = RecordingServers()
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.post("/api/chat/stop", json={"run": "r"}).json() == {"ok": False}  # no server for r yet
        assert servers.stopped == 0
    assert servers.stopped == 1

