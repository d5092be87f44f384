"""The form and YAML editor use the CLI's schema; job control, resume commands and the SSE log on real files."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from fastapi.testclient import TestClient

from dsft.config import load_config
from dsft.ui import forms
from dsft.ui.app import create_app
from dsft.ui.jobs import Jobs, resume_commands
from dsft.ui.runs import follow_log, list_runs


def test_form_defaults_are_the_demo_config_and_valid():
    values = forms.form_defaults()
    assert values["model.name_or_path"] == "embedded:tiny-deepseek-v3" and values["train.method"] == "lora"
    raw, errors = forms.config_from_form(values)
    assert errors == {}
    assert raw["train"]["num_train_epochs"] == 3.0 and raw["data"]["path"] == "embedded:medical"


def test_form_errors_land_on_their_fields(tmp_path):
    form = {**forms.form_defaults(), "train.learning_rate": "-1", "lora.r": "x", "train.method": "sgd",
            "train.per_device_train_batch_size": "big", "data.path": str(tmp_path / "missing.csv")}
    _, errors = forms.config_from_form(form)
    assert "greater than 0" in errors["train.learning_rate"]
    assert "valid integer" in errors["lora.r"]
    assert "'lora'" in errors["train.method"]
    assert "train.per_device_train_batch_size" in errors  # a union's member is mapped back to the field
    assert "no such file" in errors["data.path"]
    assert set(errors) == {"train.learning_rate", "lora.r", "train.method", "train.per_device_train_batch_size", "data.path"}


def test_form_values_are_typed_by_the_schema_and_load_with_the_cli(tmp_path):
    raw, errors = forms.config_from_form({**forms.form_defaults(), "train.learning_rate": "3e-4", "train.max_steps": "7"})
    assert errors == {} and raw["train"]["learning_rate"] == pytest.approx(3e-4) and raw["train"]["max_steps"] == 7
    p = tmp_path / "c.yaml"
    p.write_text(forms.to_yaml(raw), encoding="utf-8")
    cfg = load_config(p)
    assert cfg.train.learning_rate == pytest.approx(3e-4) and cfg.train.max_steps == 7


def test_remote_code_and_outside_paths_are_refused_from_the_browser():
    _, errors = forms.validate_yaml("model:\n  trust_remote_code: true\ntrain:\n  logging_dir: /tmp/elsewhere\n")
    keys = {e["key"]: e for e in errors}
    assert keys["model.trust_remote_code"]["line"] == 2 and keys["train.logging_dir"]["line"] == 4


def test_yaml_errors_carry_their_line():
    _, errors = forms.validate_yaml("data:\n  path: embedded:medical\n  test_size: 2\ntrain:\n  method: lora\n  epochs: 3\n")
    by_key = {e["key"]: e for e in errors}
    assert by_key["data.test_size"]["line"] == 3 and "less than 1" in by_key["data.test_size"]["message"]
    assert by_key["train.epochs"]["line"] == 6 and "Extra inputs" in by_key["train.epochs"]["message"]
    _, errors = forms.validate_yaml("train: [1, 2\n")
    assert errors[0]["key"] == "<yaml>" and errors[0]["line"] == 2


def test_the_seeds_layout_is_accepted_in_the_editor():
    raw, errors = forms.validate_yaml("model_name: embedded:tiny-deepseek-v3\ntraining_args:\n  learning_rate: 0.001\n")
    assert errors == [] and raw["train"]["learning_rate"] == 0.001
    _, errors = forms.validate_yaml("model_name: x\ntraining_args:\n  bogus: 1\n")
    assert "training_args.bogus: unknown key" in errors[0]["message"]


def _fake_run(root, name="r", steps=3):
    rd = root / name
    (rd / "train").mkdir(parents=True)
    (rd / "ui").mkdir()
    (rd / "ui" / "config.yaml").write_text("train:\n  method: lora\n", encoding="utf-8")
    lines = [json.dumps({"step": i, "loss": 9 - i, "lr": 1e-3, "grad_norm": 1.0}) for i in range(1, steps + 1)]
    (rd / "train" / "log.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "lo', encoding="utf-8")  # torn
    _age(rd)
    return rd


def _age(rd, seconds: float = 120.0) -> None:
    """A log not written for a while: the run is not going on (a fresh one counts as a CLI run in progress)."""
    t = time.time() - seconds
    os.utime(rd / "train" / "log.jsonl", (t, t))


def test_sse_sends_the_log_from_the_requested_line_and_resumes_by_last_event_id(tmp_path):
    _fake_run(tmp_path)
    c = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860")
    body = c.get("/api/runs/r/events?start=1").text
    assert [ln for ln in body.splitlines() if ln.startswith("id:")] == ["id: 2", "id: 3"]  # the torn line waits
    assert "event: status" in body and body.rstrip().endswith("event: end\ndata: {}")
    body = c.get("/api/runs/r/events", headers={"Last-Event-ID": "2"}).text
    assert [ln for ln in body.splitlines() if ln.startswith("id:")] == ["id: 3"]
    log = c.get("/api/runs/r/log").json()
    assert [r["step"] for r in log["records"]] == [1, 2, 3] and log["next"] == 3


def test_resume_runs_train_with_resume_auto_then_the_remaining_stages(tmp_path):
    rd = _fake_run(tmp_path)
    for stage in ("plan", "data"):
        (rd / stage).mkdir()
        (rd / stage / "manifest.json").write_text("{}")
    (rd / "train" / "checkpoints").mkdir()
    cmds = resume_commands(rd, rd / "ui" / "config.yaml")
    assert [c[3] for c in cmds] == ["train", "run"]
    assert cmds[0][-2:] == ["--resume", "auto"] and cmds[1][-2:] == ["--stages", "eval,export,serve"]
    (rd / "train" / "checkpoints").rmdir()
    assert resume_commands(rd, rd / "ui" / "config.yaml")[0][-1] == "train,eval,export,serve"


def test_stop_sends_sigint_to_the_process_group_and_records_it(tmp_path):
    rd = _fake_run(tmp_path)
    jobs = Jobs(tmp_path)
    code = "import time, subprocess, sys\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('got SIGINT', flush=True); sys.exit(130)\n"
    jobs.start("r", [[sys.executable, "-c", code], [sys.executable, "-c", "print('never')"]], action="start")
    time.sleep(1.0)
    assert jobs.state("r")["state"] == "running"
    jobs.stop("r")
    deadline = time.monotonic() + 20
    while jobs.state("r")["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    job = jobs.state("r")
    assert job["state"] == "stopped" and job["returncode"] == 130
    log = (rd / "ui" / "job.log").read_text()
    assert "got SIGINT" in log and "never" not in log  # the next command of a stopped job does not start


def test_a_failing_command_marks_the_job_failed(tmp_path):
    _fake_run(tmp_path)
    jobs = Jobs(tmp_path)
    jobs.start("r", [[sys.executable, "-c", "raise SystemExit(2)"]], action="start")
    deadline = time.monotonic() + 20
    while jobs.state("r")["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs.state("r")["state"] == "failed" and jobs.state("r")["returncode"] == 2


def test_a_log_rewritten_by_resume_resets_the_stream(tmp_path):
    rd = _fake_run(tmp_path, steps=3)
    recs, line, offset, reset = follow_log(rd, 0, None)
    assert [r["step"] for r in recs] == [1, 2, 3] and line == 3 and not reset
    assert follow_log(rd, line, offset)[:2] == ([], 3)  # the torn 4th line is not complete yet
    (rd / "train" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 8.5}) + "\n")  # resumed from step 1
    _age(rd)
    assert follow_log(rd, line, offset)[3] is True
    body = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860").get("/api/runs/r/events?start=3").text
    assert body.index("event: reset") < body.index("id: 1\ndata: {\"step\": 1, \"loss\": 8.5}")
    assert follow_log(tmp_path / "none", 0, None) == ([], 0, None, False)  # no log yet: wait, no reset


def test_compare_page_diffs_the_configs_and_tables_the_metrics(tmp_path):
    for name, lr in (("a", "0.001"), ("b", "0.002")):
        rd = _fake_run(tmp_path, name)
        (rd / "ui" / "config.yaml").write_text(f"train:\n  method: lora\n  learning_rate: {lr}\n", encoding="utf-8")
        (rd / "train" / "manifest.json").write_text(json.dumps({"steps": 3, "loss_first": 8.0, "loss_last": 6.0}))
    c = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860")
    r = c.get("/compare?run=a&run=b")
    assert r.status_code == 200
    assert "-  learning_rate: 0.001" in r.text and "+  learning_rate: 0.002" in r.text
    assert "train loss last" in r.text
    assert c.get("/compare?run=a").status_code == 400  # two or more


def test_pages_render_for_a_partial_run(tmp_path):
    _fake_run(tmp_path)
    c = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860")
    page = c.get("/runs/r").text
    assert "no plan stage yet" in page and "no eval stage yet" in page and "method: lora" in page
    assert 'tr data-run="r"' in c.get("/").text
    assert c.get("/new").status_code == 200 and c.get("/chat").status_code == 200
    assert c.get("/runs/missing").status_code == 404


def test_a_fresh_log_without_a_train_manifest_counts_as_running(tmp_path):
    rd = _fake_run(tmp_path)
    _age(rd, 0)
    assert list_runs(tmp_path)[0]["status"] == "running"  # a CLI run in progress
    _age(rd, 120)
    assert list_runs(tmp_path)[0]["status"] == "incomplete"
