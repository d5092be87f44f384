"""The serve stage of a run, start-up refusals (pickled adapters, a config that is a folder) and the exit
status after SIGTERM: 0 after a clean drain, 1 when the drain outlasts serve.shutdown_timeout_s."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import uvicorn
from serve_helpers import wait_healthy

from dsft.cli import main
from dsft.config import ServeConfig, load_config
from dsft.errors import DsftError, OverwriteError
from dsft.run import RunDir
from dsft.serve.app import create_app
from dsft.serve.background import bind_socket, serve_in_background
from dsft.serve.server import DrainingServer


def test_stage_run_serves_the_exported_model_and_writes_the_manifest(tmp_path, tiny_model_dir):
    from dsft.serve.stage import run

    rd = RunDir(tmp_path / "run")
    rd.stage_dir("export")
    rd.write_manifest("export", {"merged": str(tiny_model_dir)})
    cfg = load_config(None, {"serve.port": 0})
    m = run(cfg, rd)
    assert m["ok"] is True and m["status"] == 200 and m["bad_request_status"] == 400
    assert m["openai_chat_status"] == 200 and isinstance(m["openai_chat_text"], str) and isinstance(m["text"], str)
    assert set(m) == {"ok", "openai_chat_status", "openai_chat_text", "status", "bad_request_status", "prompt", "text",
                      "startup_s", "model_dir"}
    assert rd.read_manifest("serve")["ok"] is True
    with pytest.raises(OverwriteError):  # a finished stage is kept unless forced
        run(cfg, rd)


def test_pickled_lora_adapter_is_refused_in_one_line(tmp_path, tiny_model_dir, capsys):
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"r": 8}')
    (ad / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(DsftError, match="adapter_model.bin") as e:
        with serve_in_background(str(tiny_model_dir), ServeConfig(port=0, lora_modules={"x": str(ad)})):
            pass
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
    assert main(["serve", "--model", str(tiny_model_dir), "--port", "0", "--lora", f"x={ad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dsft: error:") and "adapter_model.bin" in err


@pytest.mark.parametrize("command", [["serve", "--model", "x", "--dry-run"], ["deploy", "k8s", "--model", "x", "-o"]])
def test_config_that_is_a_folder_is_one_line(tmp_path, capsys, command):
    argv = [*command, str(tmp_path / "out")] if command[-1] == "-o" else command
    assert main([*argv, "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a directory" in err


def _server(model_dir: str, drain_timeout_s: float):
    app = create_app(model_dir, ServeConfig(port=0))
    server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on"), drain_timeout_s=drain_timeout_s)
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(url, 180)
    return app.state.dsft, server, thread, url


@pytest.mark.parametrize("max_tokens, drain_timeout_s, status", [(24, 60.0, 0), (2000, 1.0, 1)])
def test_exit_status_after_sigterm(tiny_model_dir, max_tokens, drain_timeout_s, status):
    state, server, thread, url = _server(str(tiny_model_dir), drain_timeout_s)
    got = {}

    def ask():
        try:
            got["r"] = httpx.post(f"{url}/generate", timeout=120,
                                  json={"prompt": "头痛", "max_tokens": max_tokens, "temperature": 0})
        except httpx.HTTPError as err:
            got["err"] = err

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 60
    while state.engine.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.handle_exit(signal.SIGTERM, None)  # what the signal handler does in the main thread
    thread.join(120)
    t.join(120 if status == 0 else 1)  # after a cut drain nobody answers the request any more
    try:
        assert not thread.is_alive() and server.exit_status == status
        if status == 0:  # the in-flight request finished before the server stopped
            assert got["r"].status_code == 200 and got["r"].json()["usage"]["completion_tokens"] >= 1
        else:
            # the request was cut (uvicorn answers a cancelled request 500, or the connection just closes)
            assert server.drain_timed_out and ("r" not in got or got["r"].status_code == 500)
    finally:
        state.engine.stop(drain=False, timeout=10)
