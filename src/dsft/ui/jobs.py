"""Runs launched from the dashboard: ordinary `dsft run` / `dsft train --resume auto` subprocesses, stopped by SIGINT.

Each run's job state lives in <run>/ui/job.json and its output in <run>/ui/job.log, so a restarted dashboard (and
the CLI user) sees the same runs. Commands are argv lists built here from fixed sub-commands; nothing from a request
reaches a shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dsft.run import STAGES, atomic_write_json
from dsft.ui.paths import UI_DIR, UiError
from dsft.ui.runs import manifests, read_json

STOP_GRACE_S = 60.0  # SIGINT first (Ctrl-C: the trainer ends its trackers, keeps its last checkpoint), then SIGTERM


def dsft_argv(*args: str) -> list[str]:
    """`python -m dsft ARGS` with the interpreter running the dashboard (the same install as the CLI)."""
    return [sys.executable, "-m", "dsft", *args]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def resume_commands(run_dir: Path, config: Path) -> list[list[str]]:
    """What continues a stopped run: the stages without a manifest, training from its newest checkpoint."""
    done = manifests(run_dir)
    todo = [s for s in STAGES if s not in done]
    if not todo:
        raise UiError(f"run {run_dir.name!r} has finished every stage: nothing to resume")
    base = [str(config), "--run-dir", str(run_dir)]
    cmds: list[list[str]] = []
    if "train" in todo and (run_dir / "train" / "checkpoints").is_dir():
        before = todo[: todo.index("train")]
        after = todo[todo.index("train") + 1:]
        if before:
            cmds.append(dsft_argv("run", *base, "--stages", ",".join(before)))
        cmds.append(dsft_argv("train", *base, "--resume", "auto"))
        if after:
            cmds.append(dsft_argv("run", *base, "--stages", ",".join(after)))
    else:
        cmds.append(dsft_argv("run", *base, "--stages", ",".join(todo)))
    return cmds


class Jobs:
    """The dashboard's subprocesses, one job (a short sequence of dsft commands) per run at a time."""

    def __init__(self, runs_root: Path, *, stop_grace_s: float = STOP_GRACE_S):
        self.root = Path(runs_root)
        self.stop_grace_s = stop_grace_s
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}

    # -- state on disk --
    def _job_path(self, name: str) -> Path:
        return self.root / name / UI_DIR / "job.json"

    def _save(self, job: dict[str, Any]) -> None:
        atomic_write_json(self._job_path(job["name"]), job)

    def state(self, name: str) -> dict[str, Any] | None:
        """The run's job (None when the dashboard never launched it); a vanished process is reported as ended."""
        job = read_json(self._job_path(name))
        if not isinstance(job, dict):
            return None
        if job.get("state") in ("running", "stopping") and name not in self._procs and not _alive(job.get("pid")):
            # launched by an earlier dashboard that is gone: the exit code is lost, the files tell the rest
            job["state"] = "stopped" if job.get("stop_requested") else (
                "finished" if (self.root / name / "report.json").is_file() else "failed")
        return job

    def states(self) -> dict[str, dict]:
        out = {}
        if self.root.is_dir():
            for p in self.root.iterdir():
                job = self.state(p.name) if (p / UI_DIR / "job.json").is_file() else None
                if job:
                    out[p.name] = job
        return out

    def running(self, name: str) -> bool:
        job = self.state(name)
        return bool(job and job.get("state") in ("running", "stopping"))

    # -- control --
    def start(self, name: str, commands: list[list[str]], action: str) -> dict[str, Any]:
        """Run the commands one after another in the background (a new process group each)."""
        with self._lock:
            if self.running(name):
                raise UiError(f"run {name!r} is already running; stop it first")
            prev = self.state(name) or {}
            job = {"name": name, "state": "running", "action": action, "commands": commands, "current": 0,
                   "pid": None, "created": prev.get("created", time.time()), "started": time.time(), "ended": None,
                   "returncode": None, "stop_requested": False, "log": f"{UI_DIR}/job.log"}
            self._save(job)
            log_path = self.root / name / UI_DIR / "job.log"
            log_fh = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the watcher thread)
            log_fh.write(f"=== {action} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            log_fh.flush()
            self._spawn(job, 0, log_fh)
        threading.Thread(target=self._watch, args=(job, log_fh), daemon=True, name=f"dsft-ui-job-{name}").start()
        return job

    def _spawn(self, job: dict, index: int, log_fh) -> None:
        argv = job["commands"][index]
        log_fh.write("$ " + " ".join(argv[1:]) + "\n")
        log_fh.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(self.root / job["name"]), env=env, start_new_session=True)
        self._procs[job["name"]] = proc
        job.update(current=index, pid=proc.pid)
        self._save(job)

    def _watch(self, job: dict, log_fh) -> None:
        name = job["name"]
        try:
            while True:
                rc = self._procs[name].wait()
                with self._lock:
                    stopping = (read_json(self._job_path(name)) or {}).get("stop_requested", False)
                    nxt = job["current"] + 1
                    if rc == 0 and not stopping and nxt < len(job["commands"]):
                        self._spawn(job, nxt, log_fh)
                        continue
                    job.update(state="stopped" if stopping else ("finished" if rc == 0 else "failed"),
                               returncode=rc, ended=time.time(), stop_requested=stopping)
                    self._save(job)
                    self._procs.pop(name, None)
                    log_fh.write(f"=== exit {rc} ({job['state']})\n")
                    return
        finally:
            log_fh.close()

    def stop(self, name: str) -> dict[str, Any]:
        """Graceful stop: SIGINT to the run's process group (as Ctrl-C), SIGTERM after the grace period, then SIGKILL."""
        with self._lock:
            job = self.state(name)
            if not job or job.get("state") not in ("running", "stopping"):
                raise UiError(f"run {name!r} is not running")
            job.update(state="stopping", stop_requested=True)
            self._save(job)
            pid = job.get("pid")
        self._signal(pid, signal.SIGINT)
        threading.Thread(target=self._escalate, args=(name, pid), daemon=True).start()
        return job

    @staticmethod
    def _signal(pid: int | None, sig: int) -> None:
        if not pid:
            return
        try:
            os.killpg(pid, sig)  # the process group the job leads (start_new_session): workers stop too
        except (ProcessLookupError, PermissionError):
            pass

    def _escalate(self, name: str, pid: int) -> None:
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 10.0)):
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _alive(pid):
                    self._mark_stopped(name)
                    return
                time.sleep(0.2)
            self._signal(pid, sig)
        time.sleep(0.5)
        self._mark_stopped(name)

    def _mark_stopped(self, name: str) -> None:
        """For a job this dashboard did not start (no watcher thread): record the stop once the process is gone."""
        with self._lock:
            if name in self._procs:
                return
            job = read_json(self._job_path(name))
            if isinstance(job, dict) and job.get("state") == "stopping":
                job.update(state="stopped", ended=time.time())
                self._save(job)
