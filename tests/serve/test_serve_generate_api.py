"""The seed's /generate and /health on a live server: good request, bad requests → 4xx, chat template applied."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import wait_healthy
from transformers import AutoTokenizer

from dsft.config import ServeConfig
from dsft.errors import DsftError


def test_generate_good_request(server, tiny_model_dir):
    r = httpx.post(f"{server}/generate", json={"prompt": "头痛、发烧三天，应该怎么办？", "max_tokens": 12, "temperature": 0.7},
                   timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["text"], str) and body["text"]
    u = body["usage"]
    assert 1 <= u["completion_tokens"] <= 12 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # the DeepSeek chat template was applied: prompt tokens == the templated user turn
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "头痛、发烧三天，应该怎么办？"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>") and text.endswith("<｜Assistant｜>")
    assert u["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


def test_generate_defaults_and_greedy_is_deterministic(server):
    a = httpx.post(f"{server}/generate", json={"prompt": "胃疼", "max_tokens": 8, "temperature": 0}, timeout=60).json()
    b = httpx.post(f"{server}/generate", json={"prompt": "胃疼", "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert a["text"] == b["text"] and a["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("payload, param", [
    ({"prompt": 42}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
])
def test_generate_bad_fields_are_400_naming_the_field(server, payload, param):
    r = httpx.post(f"{server}/generate", json=payload, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["code"] == 400 and err["type"] == "BadRequestError"


def test_generate_bad_json_is_400(server):
    r = httpx.post(f"{server}/generate", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/generate", json=["not", "an", "object"], timeout=30)
    assert r.status_code == 400


def test_oversized_body_is_413_before_it_is_read(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # announce 17 MiB, send none of it
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (17 * 2**20))
        head = ""
        while '"code": 413' not in head:
            chunk = s.recv(65536)
            if not chunk:
                break
            head += chunk.decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and '"code": 413' in head


def test_unknown_route_and_method_are_4xx_envelopes(server):
    r = httpx.get(f"{server}/nope", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server}/generate", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_health_ok(server):
    r = httpx.get(f"{server}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_is_503_until_the_model_is_loaded(tiny_model_dir):
    from starlette.testclient import TestClient

    from dsft.serve.app import create_app

    app = create_app(str(tiny_model_dir), ServeConfig())
    client = TestClient(app)  # no lifespan: the model is not loaded yet
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/generate", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"]


def test_busy_port_falls_back_to_a_free_one(tiny_model_dir):
    from dsft.serve import serve_in_background

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    try:
        with serve_in_background(str(tiny_model_dir), ServeConfig(port=busy)) as url:
            assert not url.endswith(f":{busy}")
            assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200
        with pytest.raises(httpx.ConnectError):  # shut down
            httpx.get(f"{url}/health", timeout=5)
    finally:
        blocker.close()


def test_model_without_weights_fails_with_one_line(tmp_path):
    from dsft.serve import serve_in_background

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DsftError, match="no \\*.safetensors") as info:
        with serve_in_background(str(tmp_path), ServeConfig(port=0)):
            pass
    assert "\n" not in str(info.value)


def test_cli_serve_runs_and_stops_on_sigterm(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "serve", "--model", str(tiny_model_dir), "--host", "127.0.0.1",
                             "--port", "0", "--served-model-name", "cli-tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        wait_healthy(url, 120, proc=proc, poll_s=0.2)
        r = httpx.post(f"{url}/generate", json={"prompt": "头痛", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and isinstance(r.json()["text"], str)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "cli-tiny"
        # SIGTERM while a request is generating: it still completes (graceful shutdown)
        import threading

        inflight = {}
        t = threading.Thread(target=lambda: inflight.setdefault("r", httpx.post(
            f"{url}/generate", json={"prompt": "头痛", "max_tokens": 200, "temperature": 0}, timeout=120)))
        t.start()
        deadline = time.monotonic() + 30
        while "dsft_running_requests 1.0" not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert inflight["r"].status_code == 200 and inflight["r"].json()["usage"]["completion_tokens"] >= 1
        # a clean drain after SIGTERM exits 0 (not 143: uvicorn would re-raise the signal it caught)
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "Finished server process" in rest, rest[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_lora_flag_is_one_line_exit_2(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-m", "dsft", "serve", "--model", str(tiny_model_dir), "--lora", "nope"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "NAME=DIR" in out.stderr


def test_cli_config_section_and_flags_merge(capsys):
    import json

    from dsft.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "serve_adapters.yaml"
    assert main(["serve", "--config", str(example), "--model", "x", "--port", "9001", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["served_model_name"] == "medical-base" and cfg["port"] == 9001 and cfg["host"] == "127.0.0.1"
    assert "api_key" not in cfg


def test_cli_serves_a_run_dir(tmp_path, tiny_model_dir, capsys):
    import json

    from dsft.cli import main
    from dsft.run import RunDir

    run = RunDir(tmp_path / "run")
    (run.stage_dir("train") / "adapter").mkdir()
    run.write_manifest("train", {"base_model": str(tiny_model_dir), "method": "lora", "adapter": "adapter", "model": None})
    assert main(["serve", "--run", str(run.root), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(tiny_model_dir) and out["lora_modules"] == {"run": str((run.root / "train" / "adapter").resolve())}
    (run.stage_dir("export") / "merged").mkdir()
    run.write_manifest("export", {"merged": "merged"})
    assert main(["serve", "--run", str(run.root), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str((run.root / "export" / "merged").resolve()) and out["lora_modules"] == {}
    assert main(["serve", "--dry-run"]) == 2 and "--model" in capsys.readouterr().err


def test_cli_exits_2_when_the_model_cannot_load(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad-adapter"  # passes the start-up checks, fails in the loader thread
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dsft", "serve", "--model", str(tiny_model_dir), "--port", "0",
                          "--lora", f"bad={bad}"], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("dsft: error:") and "LoRA" in last
