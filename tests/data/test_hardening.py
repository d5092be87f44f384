"""Bad and degenerate input: everything dropped, empty files, huge values in errors; progress only on a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsft.config import DataConfig, config_from_dict
from dsft.data.load import load_records
from dsft.data.stage import run as prepare
from dsft.errors import DataError
from dsft.run import RunDir, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
HUGE = "头" * 100_000


def _dsft(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "dsft", *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.mark.parametrize("streaming", [False, True])
def test_everything_dropped_writes_rejected_and_report_first(tmp_path, streaming):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "data": {
        "streaming": streaming, "report_plots": False, "quality": {"min_chars": {"answer": 5000}}}})
    with pytest.raises(DataError) as err:
        prepare(cfg, RunDir(cfg.run_dir))
    d = Path(cfg.run_dir) / "data"
    msg = str(err.value)
    assert "\n" not in msg and str(d / "rejected.jsonl") in msg and "no record left" in msg
    rej = read_jsonl(d / "rejected.jsonl")
    rep = json.loads((d / "data_report.json").read_text(encoding="utf-8"))
    c = rep["counts"]
    assert c["input"] == 1667 == len(rej) + len(read_jsonl(d / "duplicates.jsonl")) and c["kept"] == 0
    assert c["input"] == c["kept"] + sum(c["dropped"].values()) and rep["accounting_holds"]
    assert {r["reason"] for r in rej} == set(c["dropped"]) == {"too_short:answer"}
    assert "input 1667 = kept 0" in (d / "data_report.md").read_text(encoding="utf-8")
    assert not (d / "manifest.json").exists() and not (d / ".work").exists()
    with pytest.raises(DataError, match="no record left"):  # the stage never finished: a rerun needs no --force
        prepare(cfg, RunDir(cfg.run_dir))


@pytest.mark.parametrize("content", ["", "question,answer\n"])
def test_stats_and_dedup_refuse_an_empty_file_in_one_line(tmp_path, content):
    empty = tmp_path / ("e.csv" if content else "e.jsonl")
    empty.write_text(content, encoding="utf-8")
    for args in (("stats", str(empty)), ("dedup", str(empty), "-o", str(tmp_path / "out.jsonl"))):
        r = _dsft("data", *args)
        assert r.returncode == 2 and r.stderr == f"dsft: error: {empty}: no records (empty dataset)\n", (args, r.stderr)
    assert not (tmp_path / "out.jsonl").exists()


def _error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_records(DataConfig(path=str(path), **kw), strict=True)
    return str(err.value)


def test_errors_quote_at_most_200_characters_of_a_value(tmp_path):
    role = tmp_path / "role.jsonl"
    role.write_text(json.dumps({"conversations": [{"from": HUGE, "value": "头痛"}, {"from": "gpt", "value": "休息"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    header = tmp_path / "header.csv"
    header.write_text(f"{HUGE},answer\n头痛,休息\n", encoding="utf-8")
    key = tmp_path / "key.jsonl"
    key.write_text(json.dumps({HUGE: "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    dup = tmp_path / "dup.csv"
    dup.write_text(f"{HUGE},{HUGE},answer\n", encoding="utf-8")
    cases = {role: ({}, "bad_role"), header: ({"columns": {"question": "title"}}, "column 'title'"),
             key: ({}, "cannot tell the schema"), dup: ({}, "duplicate column name"),
             tmp_path / "missing.csv": ({"columns": {"question": HUGE}}, "data file not found")}
    for path, (kw, what) in cases.items():
        msg = _error(path, **kw)
        assert what in msg and "\n" not in msg, msg[:300]
        assert len(msg) < 200 * 2 + len(str(path)) + 200, (path.name, len(msg))
        assert HUGE[:201] not in msg and ("100,00" in msg or HUGE not in msg)


def _stderr_through(tmp_path: Path, name: str, *, tty: bool) -> str:
    """stderr of `dsft data prepare` on the packaged subset, connected to a pseudo-terminal or to a pipe."""
    args = [sys.executable, "-m", "dsft", "data", "prepare", "--run-dir", str(tmp_path / name),
            "--set", "data.report_plots=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if not tty:
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return r.stderr
    master, slave = os.openpty()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not block:
            break
        out += block
    os.close(master)
    assert p.wait(timeout=300) == 0 and b"1667 in" in p.stdout.read()
    return out.decode("utf-8", "replace")


def test_progress_shows_on_a_terminal_and_not_when_piped(tmp_path):
    shown = _stderr_through(tmp_path, "tty", tty=True)
    assert re.search(r"data read\b.*1\.67k records", shown), shown[-500:]
    # a step with a known total: count/total, then elapsed<ETA and the rate
    assert re.search(r"data quality\b.*1\.67k/1\.67k \[\d\d:\d\d<\d\d:\d\d, *[\d.]+k? records/s\]", shown), shown[-500:]
    assert "data split" in shown
    assert "records" not in _stderr_through(tmp_path, "pipe", tty=False)
