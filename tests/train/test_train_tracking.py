"""report_to mlflow / wandb: a tiny real training run logs offline, and the tracker's own reader gets the same numbers."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from train_helpers import Crash, crash_at, make_run, medical_records, tiny_cfg

from dsft.errors import TrainError
from dsft.train import train

STEPS = 3


def _step_losses(stage) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (stage / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


@pytest.fixture
def clean_tracker_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT",
              "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    # newer MLflow refuses file stores unless this is set: the Monitor must set it itself (and leak nothing here)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset-by-fixture")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_mlflow_file_store_holds_params_per_step_loss_eval_and_loss_png(tmp_path, clean_tracker_env):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'dsft[track]')")
    from mlflow.tracking import MlflowClient

    run = make_run(tmp_path, medical_records(8), eval_records=medical_records(10)[16:])
    cfg = tiny_cfg(tmp_path, max_steps=STEPS, report_to=["mlflow"], per_device_train_batch_size=4,
                   eval_steps=STEPS, evaluation_strategy="steps", learning_rate=3e-4)
    train(cfg, run)
    stage = tmp_path / "train"
    store = stage / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    run_id = (stage / "mlflow_run_id").read_text().strip()
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    hist = client.get_metric_history(run_id, "loss")
    want = _step_losses(stage)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in hist} == pytest.approx(want, rel=1e-9) and len(hist) == STEPS
    assert len(client.get_metric_history(run_id, "lr")) == STEPS
    assert len(client.get_metric_history(run_id, "grad_norm")) == STEPS
    ev = client.get_metric_history(run_id, "eval_loss")
    assert [m.step for m in ev] == [STEPS] and ev[0].value > 0
    p = r.data.params
    assert p["method"] == "lora" and float(p["learning_rate"]) == 3e-4 and p["lora_r"].isdigit()
    assert p["max_steps"] == str(STEPS) and "effective_batch" in p and "epochs" in p
    assert "loss.png" in [a.path for a in client.list_artifacts(run_id)]


def test_mlflow_run_ends_failed_when_training_stops_on_nan(tmp_path, clean_tracker_env):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'dsft[track]')")
    import mlflow
    from mlflow.tracking import MlflowClient

    run = make_run(tmp_path, medical_records(8))
    cfg = tiny_cfg(tmp_path, max_steps=40, report_to=["mlflow"], learning_rate=1e4, lr_scheduler="constant",
                   warmup_ratio=0.0, max_grad_norm=1e30)
    with pytest.raises(TrainError, match="training loss is"):
        train(cfg, run)
    assert mlflow.active_run() is None
    stage = tmp_path / "train"
    client = MlflowClient(tracking_uri=(stage / "mlruns").resolve().as_uri())
    r = client.get_run((stage / "mlflow_run_id").read_text().strip())
    assert r.info.status == "FAILED"
    assert len(client.get_metric_history(r.info.run_id, "loss")) >= 1


def test_resume_after_a_crash_continues_the_same_mlflow_and_wandb_runs(tmp_path, clean_tracker_env):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'dsft[track]')")
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'dsft[track]')")
    import wandb
    from mlflow.tracking import MlflowClient

    run = make_run(tmp_path, medical_records(8))
    cfg = tiny_cfg(tmp_path, max_steps=4, save_steps=2, report_to=["mlflow", "wandb"], per_device_train_batch_size=4)
    stage = tmp_path / "train"
    try:
        with pytest.raises(Crash):
            train(cfg, run, fault_hook=crash_at(3))
        assert wandb.run is None
        first_ml, first_wb = ((stage / f).read_text().strip() for f in ("mlflow_run_id", "wandb_run_id"))
        client = MlflowClient(tracking_uri=(stage / "mlruns").resolve().as_uri())
        assert client.get_run(first_ml).info.status == "FAILED"
        train(cfg, run, resume="auto")
    finally:
        wandb.teardown()
    assert (stage / "mlflow_run_id").read_text().strip() == first_ml
    assert (stage / "wandb_run_id").read_text().strip() == first_wb
    r = client.get_run(first_ml)
    assert r.info.status == "FINISHED"
    assert len(client.search_runs([r.info.experiment_id])) == 1
    hist = client.get_metric_history(first_ml, "loss")
    assert {m.step: m.value for m in hist} == pytest.approx(_step_losses(stage), rel=1e-9) and len(hist) == 4
    runs = sorted((stage / "wandb").glob(f"offline-run-*-{first_wb}"))
    assert 1 <= len(runs) <= 2  # both attempts log under one run id (two folders unless started the same second)
    if len(runs) == 2:
        assert _read_wandb_log(runs[0] / f"run-{first_wb}.wandb")[-1].exit.exit_code == 1
    last = _read_wandb_log(runs[-1] / f"run-{first_wb}.wandb")
    steps = [json.loads(next(i.value_json for i in rec.history.item if _key(i) == "_step"))
             for rec in last if rec.WhichOneof("record_type") == "history"]
    assert 4 in steps and last[-1].exit.exit_code == 0


def test_mlflow_tracking_uri_from_the_environment_wins(tmp_path, clean_tracker_env, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'dsft[track]')")
    from dsft.config import TrainConfig
    from dsft.train.monitor import Monitor

    elsewhere = tmp_path / "central-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    (tmp_path / "train").mkdir()
    mon = Monitor(tmp_path / "train", TrainConfig(report_to=["mlflow"]))
    mon.step({"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.0})
    mon.close()
    assert elsewhere.is_dir() and not (tmp_path / "train/mlruns").exists()


def _read_wandb_log(path) -> list:
    """The records of an offline run's .wandb file (W&B header, then leveldb-log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at byte {pos}"
        buf += chunk
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "train/loss" is stored as the nested key [train, loss]


def _wandb_children() -> list[str]:
    psutil = pytest.importorskip("psutil")
    return [p.name() for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]


def test_wandb_offline_run_holds_config_per_step_loss_and_final_summary(tmp_path, clean_tracker_env):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'dsft[track]')")
    import wandb

    run = make_run(tmp_path, medical_records(8))
    cfg = tiny_cfg(tmp_path, max_steps=STEPS, report_to=["wandb"], per_device_train_batch_size=4)
    try:
        train(cfg, run)
        assert wandb.run is None  # finish() ran
    finally:
        wandb.teardown()  # the wandb service process must not outlive the test
    assert not _wandb_children()
    stage = tmp_path / "train"
    run_id = (stage / "wandb_run_id").read_text().strip()
    runs = list((stage / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, sorted(p.name for p in (stage / "wandb").iterdir())
    recs = _read_wandb_log(runs[0] / f"run-{run_id}.wandb")
    kinds = [r.WhichOneof("record_type") for r in recs]
    assert kinds[-1] == "exit" and recs[-1].exit.exit_code == 0
    want = _step_losses(stage)
    hist = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                hist.append((items["_step"], items["train/loss"]))
    assert dict(hist) == pytest.approx(want, rel=1e-12) and len(hist) == STEPS
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["train/loss"] == pytest.approx(want[STEPS], rel=1e-12)
    config = {_key(i): json.loads(i.value_json) for r in recs if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["method"] == "lora" and config["max_steps"] == STEPS and config["lora_r"] > 0
    assert "effective_batch" in config and "learning_rate" in config
