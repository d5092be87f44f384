"""samples.jsonl: the append-only output of sampling, one line per completed prompt (all its samples); the set of
prompt ids in it is the done-set a resumed run skips. A torn last line (a crash mid-write) is cut off on load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.config.distill import DistillConfig
from dsft.errors import ConfigError, DataError
from dsft.run import atomic_write_json

# settings that change what a sample is: a resumed run refuses to mix samples made under different ones
FINGERPRINT_KEYS = ("model", "samples_per_prompt", "prompt_template", "system_prompt")


@dataclass
class Done:
    """What samples.jsonl holds: one row per completed prompt, and the tokens they cost."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    """prompt id → prompt fingerprint."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    torn_bytes: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.ids[row["prompt_id"]] = row["prompt_sha"]
        for s in row["samples"]:
            self.prompt_tokens += s["usage"].get("prompt_tokens", 0)
            self.completion_tokens += s["usage"].get("completion_tokens", 0)


def load(path: Path) -> Done:
    """Read samples.jsonl, cutting off a torn last line; a bad line before the last one is a DataError."""
    done = Done()
    if not path.exists():
        return done
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    lines = raw[:end].split(b"\n")[:-1]
    good = 0
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "prompt_id" not in row or not isinstance(row.get("samples"), list):
                raise ValueError("not a prompt row")
        except ValueError as err:
            if n == len(lines):  # the last complete line can still be garbage from a crash: treat it as torn
                break
            raise DataError(f"{path}:{n}: not a samples row ({err}); fix or remove the line, or pass --force "
                            "to start over") from err
        if row["prompt_id"] in done.ids:
            raise DataError(f"{path}:{n}: prompt {row['prompt_id']!r} appears twice")
        done.add(row)
        good += len(line) + 1
    if good < len(raw):
        done.torn_bytes = len(raw) - good
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return done


def append(path: Path, row: dict[str, Any]) -> None:
    """One prompt's row, appended in a single write and synced to disk before the prompt counts as done."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(dc: DistillConfig) -> dict[str, Any]:
    t = dc.teacher
    return {"model": t.model, "samples_per_prompt": dc.samples_per_prompt, "prompt_template": dc.prompt_template,
            "system_prompt": dc.system_prompt, "base_url": t.base_url, "max_tokens": t.max_tokens,
            "temperature": t.temperature, "top_p": t.top_p}


def check_fingerprint(path: Path, dc: DistillConfig, has_samples: bool) -> None:
    """teacher.json beside samples.jsonl: written at the start; a resumed run with other settings is refused."""
    now = fingerprint(dc)
    if path.exists() and has_samples:
        was = json.loads(path.read_text(encoding="utf-8"))
        for key in FINGERPRINT_KEYS:
            if was.get(key) != now[key]:
                raise ConfigError(f"distill: {key} changed since {path.parent / 'samples.jsonl'} was started (was "
                                  f"{was.get(key)!r}, now {now[key]!r}); restore it to resume, or pass --force to "
                                  "start over")
    atomic_write_json(path, now)
