"""`dsft deploy docker`: a Dockerfile whose CMD our CLI accepts, with a /health HEALTHCHECK; vLLM variant."""

from __future__ import annotations

import json
import shlex

from dsft.cli import build_parser, main


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_docker_transformers(tmp_path):
    out = tmp_path / "docker"
    assert main(["deploy", "docker", "--model", "runs/demo/export/merged", "-o", str(out), "--bake-model", "runs/demo/export/merged"]) == 0
    ins = _instructions((out / "Dockerfile").read_text())
    kinds = [k for k, _ in ins]
    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds and kinds.count("CMD") == 1
    d = dict(ins)
    assert d["EXPOSE"] == "8000" and "/health" in d["HEALTHCHECK"] and d["USER"] == "1000"
    assert json.loads(d["ENTRYPOINT"]) == ["dsft", "serve"]
    args = build_parser().parse_args(["serve", *json.loads(d["CMD"])])
    assert args.model == "/models/merged" and args.host == "0.0.0.0"
    assert ("COPY", "runs/demo/export/merged /models/merged") in ins
    assert (out / "Dockerfile.dockerignore").exists()
    assert main(["deploy", "docker", "--model", "m", "-o", str(out)]) == 2  # no overwrite without --force


def test_docker_vllm(tmp_path):
    out = tmp_path / "docker-vllm"
    assert main(["deploy", "docker", "--model", "/data/merged", "--engine", "vllm", "-o", str(out)]) == 0
    d = dict(_instructions((out / "Dockerfile").read_text()))
    assert json.loads(d["ENTRYPOINT"]) == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    cmd = json.loads(d["CMD"])
    assert cmd[cmd.index("--model") + 1] == "/models/merged" and "--served-model-name" in cmd
    assert "/health" in d["HEALTHCHECK"]
    assert "pip install --no-deps ." in d["RUN"] and "DSFT_SERVED_MODEL_NAME=merged" in d["ENV"]
    assert cmd[cmd.index("--middleware") + 1] == "dsft.serve.seed_compat.SeedGenerateMiddleware"


def test_serve_engine_vllm_dry_run_maps_flags(tmp_path, capsys):
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))  # vLLM allows 8/16/32…: rounds up
    rc = main(["serve", "--model", "/data/m", "--engine", "vllm", "--dry-run", "--port", "9000", "--max-batch-size", "32",
               "--max-model-len", "4096", "--lora", f"med={adapter}", "--chat-template", "r1-distill"])
    assert rc == 0
    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]

    def val(flag):
        return cmd[cmd.index(flag) + 1]

    assert val("--port") == "9000" and val("--max-num-seqs") == "32" and val("--max-model-len") == "4096"
    assert "--enable-lora" in cmd and val("--lora-modules") == f"med={adapter}" and val("--max-lora-rank") == "16"
    assert val("--reasoning-parser") == "deepseek_r1" and open(val("--chat-template")).read().strip()
    assert "--api-key" not in cmd  # passed through the environment, not argv


def test_serve_engine_vllm_without_vllm_is_one_line(tmp_path, capsys):
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm", "--port", "9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "vLLM is not installed" in err and "\n" not in err
    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm", "--port", "0", "--dry-run"]) == 2
    assert "fixed --port" in capsys.readouterr().err
