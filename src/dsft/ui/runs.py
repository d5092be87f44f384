"""Read run directories from their files on disk only: manifests, log.jsonl, reports, the config a run used."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dsft.run import STAGES
from dsft.ui.paths import RUN_NAME, UI_DIR

CONFIG_FILES = ("resolved_config.yaml", f"{UI_DIR}/config.yaml")  # the first present is the run's exact config
LIVE_SECONDS = 30.0  # a log.jsonl written this recently, without a train manifest, counts as a run going on


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or torn (a stage may be writing it right now)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifests(run_dir: Path) -> dict[str, dict]:
    """{stage: manifest} for every finished stage of the run."""
    out = {}
    for stage in STAGES:
        m = read_json(run_dir / stage / "manifest.json")
        if isinstance(m, dict):
            out[stage] = m
    return out


def read_log(run_dir: Path, start: int = 0) -> tuple[list[dict], int]:
    """train/log.jsonl records from line `start` on (a torn last line is left for later); returns (records, next line)."""
    path = run_dir / "train" / "log.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return [], start
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline may still be being written
    out = []
    for line in complete[start:]:
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec = None
        out.append(rec if isinstance(rec, dict) else {})
    return out, len(complete)


def follow_log(run_dir: Path, line: int, offset: int | None) -> tuple[list[dict], int, int | None, bool]:
    """New complete lines of train/log.jsonl after byte `offset` (None: seek to line `line` first).

    Returns (records, next line, next offset, reset); reset is True when the file no longer holds `line` lines or
    shrank below `offset` (a resumed run rewrote it from its checkpoint): the caller starts again from line 0."""
    path = run_dir / "train" / "log.jsonl"
    try:
        with open(path, "rb") as fh:
            if offset is None:
                for _ in range(line):
                    if not fh.readline().endswith(b"\n"):
                        return [], 0, None, True
                offset = fh.tell()
            elif path.stat().st_size < offset:
                return [], 0, None, True
            fh.seek(offset)
            data = fh.read()
    except OSError:  # no log yet
        return [], line, offset, False
    end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
    out = []
    for raw in data[:end].split(b"\n")[:-1]:
        try:
            rec = json.loads(raw) if raw.strip() else None
        except ValueError:
            rec = None
        out.append(rec if isinstance(rec, dict) else {})
    return out, line + len(out), offset + end, False


def config_text(run_dir: Path) -> tuple[str | None, str | None]:
    """(file name, text) of the exact config the run used, when one was written."""
    for rel in CONFIG_FILES:
        p = run_dir / rel
        if p.is_file():
            return rel, p.read_text(encoding="utf-8")
    return None, None


def config_dict(run_dir: Path) -> dict:
    """The run's config as a mapping ({} when none is on disk)."""
    import yaml

    _, text = config_text(run_dir)
    try:
        d = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        d = None
    return d if isinstance(d, dict) else {}


def is_run_dir(p: Path) -> bool:
    return p.is_dir() and RUN_NAME.match(p.name) is not None and (
        any((p / s).is_dir() for s in STAGES) or (p / UI_DIR).is_dir() or (p / "report.json").is_file())


def _created(run_dir: Path) -> float:
    times = [run_dir.stat().st_mtime]
    for rel in (f"{UI_DIR}/job.json", "plan/manifest.json", "data/manifest.json"):
        p = run_dir / rel
        if p.exists():
            times.append(p.stat().st_mtime)
    job = read_json(run_dir / UI_DIR / "job.json")
    if isinstance(job, dict) and isinstance(job.get("created"), int | float):
        return float(job["created"])
    return min(times)


def status(run_dir: Path, mans: dict[str, dict], job: dict | None) -> str:
    """running / stopped / failed / finished / incomplete, from the job state and the files."""
    if job and job.get("state") in ("running", "stopping"):
        return job["state"]
    if job and job.get("state") in ("stopped", "failed"):
        return job["state"]
    if (run_dir / "report.json").is_file() or (job and job.get("state") == "finished"):
        return "finished"
    log = run_dir / "train" / "log.jsonl"
    if "train" not in mans and log.exists() and time.time() - log.stat().st_mtime < LIVE_SECONDS:
        return "running"
    return "incomplete"


def best_eval(mans: dict[str, dict], log: list[dict]) -> dict[str, float]:
    """The fine-tuned model's headline metrics (eval stage), else the best eval_loss seen during training."""
    after = (mans.get("eval") or {}).get("after") or {}
    out = {k: after[k] for k in ("accuracy", "rouge_l", "loss") if isinstance(after.get(k), int | float)}
    if out:
        return out
    losses = [r["eval_loss"] for r in log if r.get("event") == "eval" and isinstance(r.get("eval_loss"), int | float)]
    return {"eval_loss": min(losses)} if losses else {}


def summary(run_dir: Path, job: dict | None = None) -> dict[str, Any]:
    """One row of the runs list: status, model, method, data size, steps, best eval, created."""
    mans = manifests(run_dir)
    cfg = config_dict(run_dir)
    log, _ = read_log(run_dir)
    train_m, data_m = mans.get("train") or {}, mans.get("data") or {}
    steps = [r["step"] for r in log if "loss" in r and "event" not in r and isinstance(r.get("step"), int)]
    counts = data_m.get("counts") or {}
    report = read_json(run_dir / "report.json") or {}
    model = (cfg.get("model") or {}).get("name_or_path") or (report.get("config") or {}).get("model") \
        or train_m.get("base_model")
    method = train_m.get("method") or (cfg.get("train") or {}).get("method") or (report.get("config") or {}).get("method")
    return {
        "name": run_dir.name,
        "status": status(run_dir, mans, job),
        "model": model,
        "method": method,
        "data": {"input": counts.get("input"), "train": counts.get("train"), "test": counts.get("test")},
        "steps": train_m.get("steps") or (max(steps) if steps else None),
        "total_steps": train_m.get("total_steps"),
        "best_eval": best_eval(mans, log),
        "created": _created(run_dir),
        "stages": [s for s in STAGES if s in mans],
    }


def list_runs(runs_root: Path, jobs: dict[str, dict] | None = None) -> list[dict]:
    """Every run folder directly under the runs directory, newest first."""
    if not runs_root.is_dir():
        return []
    jobs = jobs or {}
    rows = [summary(p, jobs.get(p.name)) for p in runs_root.iterdir() if is_run_dir(p)]
    return sorted(rows, key=lambda r: r["created"], reverse=True)
