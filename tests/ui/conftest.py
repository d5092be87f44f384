"""Fixtures of the dashboard tests: a real `dsft ui` process, a short real `dsft run`, headless Chromium (Selenium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

DEMO_SETTINGS = [  # a SHORT run on the embedded model: every stage but the serve check, in well under a minute
    "train.max_steps=12", "train.save_steps=6", "data.max_samples=300", "data.max_seq_length=128",
    "data.report_plots=false", "eval.max_samples=4", "eval.max_new_tokens=8", "eval.variants=[]",
    "export.formats=[merged]", "export.report=false",
]
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "src" / "dsft" / "assets" / "demo.yaml"


def start_ui(runs: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`dsft ui --runs RUNS --port 0` as a subprocess; returns (process, the URL it printed). Its further output
    goes to RUNS/../<runs name>-ui.log (a pipe nobody reads would fill up and block the server)."""
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "ui", "--runs", str(runs), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"on (http://\S+)", line):
            sink = runs.parent / f"{runs.name}-ui.log"
            threading.Thread(target=_drain, args=(proc, sink), daemon=True).start()
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"dsft ui did not print its URL (exit {proc.poll()})")


def _drain(proc: subprocess.Popen, sink: Path) -> None:
    with open(sink, "a", encoding="utf-8") as fh:
        for line in proc.stdout:
            fh.write(line)
            fh.flush()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-runs")


@pytest.fixture(scope="session")
def demo_run(runs_dir):
    """Starts a short `dsft run` of the demo config into runs/demo (in the background: tests that need it wait)."""
    rd = runs_dir / "demo"
    log = open(runs_dir / "demo.log", "w", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "run", str(DEMO_CONFIG), "--run-dir", str(rd),
                             "--stages", "plan,data,train,eval,export", *[a for s in DEMO_SETTINGS for a in ("--set", s)]],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc, rd
    stop(proc)
    log.close()


@pytest.fixture(scope="session")
def finished_demo(demo_run, runs_dir) -> Path:
    proc, rd = demo_run
    rc = proc.wait(timeout=600)
    assert rc == 0, (runs_dir / "demo.log").read_text(encoding="utf-8")[-3000:]
    return rd


@pytest.fixture(scope="session")
def ui(runs_dir):
    """The dashboard over the session's runs directory (loopback, free port)."""
    proc, url = start_ui(runs_dir)
    yield url.rstrip("/")
    stop(proc)


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Selenium through Debian's chromium-driver (nothing is downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install 'dsft[ui]' for the browser tests")
    found = _chromium()
    if found is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800", "--lang=zh-CN"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(found[1]))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: $DSFT_UI_SCREENSHOTS (docs/img to refresh the README's) or a temporary folder."""
    target = os.environ.get("DSFT_UI_SCREENSHOTS")
    p = Path(target) if target else tmp_path_factory.mktemp("ui-shots")
    p.mkdir(parents=True, exist_ok=True)
    return p
