"""The CLI: help with examples for every command; bad input gets one line and exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsft.cli import STAGE_CLIS, main

ROOT = Path(__file__).resolve().parents[2]


def _dsft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ["demo", "run", "data", "train", "eval", "export", "serve", "plan"]:
        assert cmd in out
    assert "examples:" in out


@pytest.mark.parametrize("cmd", STAGE_CLIS)
def test_each_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: dsft " + cmd in capsys.readouterr().out


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epochs: 3\n", encoding="utf-8")
    r = _dsft("run", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err == [f"dsft: error: {cfg}: train.epochs: unknown key"]
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nope: 1\n", encoding="utf-8")
    r = _dsft("run", str(cfg), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_config_file(tmp_path):
    r = _dsft("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_bad_stage_list(tmp_path):
    r = _dsft("run", "--stages", "data,fly", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown stage(s) fly" in r.stderr


def test_demo_prints_its_config():
    r = _dsft("demo", "--print-config")
    assert r.returncode == 0 and "embedded:tiny-deepseek-v3" in r.stdout
