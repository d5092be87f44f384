"""Safe by default: paths stay inside the runs directory, Host/Origin/token checks, no state change cross-site."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from conftest import start_ui, stop
from fastapi.testclient import TestClient

from dsft.ui.app import create_app
from dsft.ui.paths import UiError, inside, run_file


@pytest.fixture()
def runs(tmp_path):
    rd = tmp_path / "runs" / "r1"
    (rd / "eval").mkdir(parents=True)
    (rd / "eval" / "report.html").write_text("<h1>报告</h1>", encoding="utf-8")
    (rd / "eval" / "manifest.json").write_text(json.dumps({"stage": "eval", "after": {"accuracy": 0.5}}))
    (tmp_path / "secret.txt").write_text("top secret")
    return tmp_path / "runs"


def client(runs, **kw) -> TestClient:
    return TestClient(create_app(runs, **kw), base_url="http://127.0.0.1:7860")


@pytest.mark.parametrize("rel", ["../secret.txt", "../../secret.txt", "/etc/passwd", "eval/../../../secret.txt",
                                 "C:/x", "a\x00b"])
def test_paths_outside_the_run_are_refused(runs, rel):
    with pytest.raises(UiError):
        run_file(runs, "r1", rel)


def test_a_symlink_out_of_the_run_is_refused(runs):
    os.symlink(runs.parent / "secret.txt", runs / "r1" / "eval" / "link.txt")
    with pytest.raises(UiError, match="outside"):
        run_file(runs, "r1", "eval/link.txt")
    assert inside(runs / "r1", "eval/report.html").is_file()


@pytest.mark.parametrize("path", ["/runs/r1/files/%2e%2e/%2e%2e/secret.txt", "/runs/r1/files/%2Fetc%2Fpasswd",
                                  "/runs/%2e%2e/files/secret.txt", "/api/runs/%2e%2e/log", "/runs/r1/files/..%2F..%2Fsecret.txt"])
def test_http_traversal_is_refused(runs, path):
    r = client(runs).get(path)
    assert r.status_code in (400, 404) and "top secret" not in r.text


def test_run_files_are_served_with_chinese(runs):
    r = client(runs).get("/runs/r1/files/eval/report.html")
    assert r.status_code == 200 and "报告" in r.text


def test_foreign_host_is_refused_on_loopback(runs):
    assert TestClient(create_app(runs), base_url="http://attacker.example:7860").get("/").status_code == 403
    assert client(runs).get("/").status_code == 200


def test_state_changes_need_the_same_origin(runs):
    c = client(runs)
    r = c.post("/api/runs", json={"name": "x", "form": {}}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    r = c.post("/api/runs/r1/stop", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    r = c.post("/api/runs/r1/stop", headers={"Origin": "http://127.0.0.1:7860"})
    assert r.status_code == 400 and "not running" in r.json()["error"]  # same origin: reaches the handler
    assert not (runs / "x").exists()


def test_token_is_required_when_set(runs):
    c = client(runs, token="s3cret", loopback=False)
    assert c.get("/").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/?token=s3cret", follow_redirects=False)  # the printed URL: token → HttpOnly cookie, then a clean URL
    assert r.status_code == 303 and "token" not in r.headers["location"] and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/").status_code == 200  # the cookie now


def test_dsft_ui_off_loopback_prints_a_token_url_and_refuses_without_it(tmp_path):
    proc, url = start_ui(tmp_path, "--host", "0.0.0.0")
    try:
        assert "token=" in url
        base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(base, timeout=10).status_code == 401
        assert httpx.get(url.replace("0.0.0.0", "127.0.0.1"), timeout=10, follow_redirects=True).status_code == 200
    finally:
        stop(proc)


def test_dsft_ui_on_loopback_serves_the_runs_list(tmp_path):
    proc, url = start_ui(tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200 and "No runs" in r.text
    finally:
        stop(proc)
