"""Training monitors: log.jsonl, TensorBoard/MLflow/W&B, loss-health rule, NaN stop, grad-norm spikes, loss.png."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

from dsft.errors import TrainError

log = logging.getLogger("dsft.train")


class Monitor:
    """Receives one record per optimizer step; writes log.jsonl, feeds trackers, applies the health rules."""

    def __init__(self, stage_dir: Path, tcfg, *, start_step: int = 0, history: list[dict] | None = None,
                 is_main: bool = True):
        self.dir = stage_dir
        self.cfg = tcfg
        self.is_main = is_main
        self.log_path = stage_dir / "log.jsonl"
        self.history: list[dict] = list(history or [])
        self.health_warned = any(h.get("event") == "loss_health" for h in self.history)
        self.tb = None
        self.mlflow = None
        self.wandb = None
        if is_main:
            self._truncate_log(start_step)
            self._open_trackers(start_step)

    # -- log.jsonl (a resumed run drops lines after its checkpoint, then appends) --
    def _truncate_log(self, start_step: int) -> None:
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line after kill -9
            if rec.get("step", 0) <= start_step:
                keep.append(line)
        self.log_path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def _write(self, rec: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def event(self, step: int, kind: str, **info: Any) -> None:
        rec = {"step": step, "event": kind, **info}
        self.history.append(rec)
        self._write(rec)
        log.warning("dsft train: step %d: %s %s", step, kind, json.dumps(info, ensure_ascii=False))

    def _open_trackers(self, start_step: int) -> None:
        report = [r for r in self.cfg.report_to if r != "none"]
        if "tensorboard" in report:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(self.cfg.logging_dir) if self.cfg.logging_dir else self.dir / "tb"
            self.tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        if "mlflow" in report:
            try:
                import mlflow
            except ImportError as err:
                raise TrainError("train.report_to lists mlflow but it is not installed "
                                 "(pip install 'dsft[track]' or mlflow-skinny)") from err
            # offline by default: a file store under the run's train folder unless MLFLOW_TRACKING_URI is set
            self.mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not self.mlflow_uri:
                self.mlflow_uri = (self.dir / "mlruns").resolve().as_uri()
            if self.mlflow_uri.startswith("file:") or "://" not in self.mlflow_uri:
                # newer MLflow refuses a file store (ours or one named in MLFLOW_TRACKING_URI) unless opted in;
                # it still reads and writes it fine, and a file store is what works offline without a database
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(self.mlflow_uri)
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dsft")
            prev = (self.dir / "mlflow_run_id").read_text().strip() if start_step and (self.dir / "mlflow_run_id").exists() else None
            if mlflow.active_run() is not None:
                mlflow.end_run()
            try:
                run = mlflow.start_run(run_id=prev) if prev else mlflow.start_run(run_name=self.dir.parent.name)
            except Exception:  # the resumed run is gone (other store): start a new one
                run = mlflow.start_run(run_name=self.dir.parent.name)
            (self.dir / "mlflow_run_id").write_text(run.info.run_id + "\n", encoding="utf-8")
            self.mlflow = mlflow
            self.mlflow_run_id = run.info.run_id
        if "wandb" in report:
            try:
                import wandb
            except ImportError as err:
                raise TrainError("train.report_to lists wandb but it is not installed "
                                 "(pip install 'dsft[track]' or wandb)") from err
            # offline unless the user asked for online (WANDB_MODE) or logged in (WANDB_API_KEY)
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            prev = (self.dir / "wandb_run_id").read_text().strip() if start_step and (self.dir / "wandb_run_id").exists() else None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "dsft", dir=str(self.dir), mode=mode,
                                    name=self.dir.parent.name, id=prev, resume="allow" if prev else None,
                                    settings=wandb.Settings(silent=True, console="off"))
            (self.dir / "wandb_run_id").write_text(self.wandb.id + "\n", encoding="utf-8")

    def log_params(self, params: dict[str, Any]) -> None:
        """The resolved training config (lr, rank, batch, epochs, method …) as tracker params / config."""
        if not self.is_main:
            return
        flat = {k: v for k, v in params.items() if v is not None}
        if self.mlflow is not None:
            try:
                self.mlflow.log_params({k: str(v) for k, v in flat.items()})
            except Exception as err:  # a resumed run may not change a param's value
                log.warning("dsft train: mlflow params not logged: %s", str(err).splitlines()[0])
        if self.wandb is not None:
            self.wandb.config.update(flat, allow_val_change=True)

    # -- per step --
    def step(self, rec: dict[str, Any]) -> None:
        step, loss = rec["step"], rec["loss"]
        if not math.isfinite(loss):
            self.event(step, "nan_loss", loss=str(loss))
            raise TrainError(f"training loss is {loss} at step {step}: stopped. Hints: lower train.learning_rate "
                             f"(now {rec.get('lr_base')}), keep train.max_grad_norm on, use fp32/bf16 instead of fp16, "
                             f"check the data for empty or huge examples")
        losses = [h["loss"] for h in self.history if "loss" in h]
        norms = [h["grad_norm"] for h in self.history[-50:] if "grad_norm" in h]
        self.history.append(rec)
        self._write(rec)
        gn = rec.get("grad_norm")
        if gn is not None and len(norms) >= 10 and math.isfinite(gn):
            med = statistics.median(norms)
            if med > 0 and gn > self.cfg.grad_spike_factor * med:
                self.event(step, "grad_norm_spike", grad_norm=gn, median=med)
        if losses and not self.health_warned and step >= self.cfg.loss_health_steps:
            self._check_loss_health(step)
        if step % self.cfg.logging_steps == 0 or step == 1:
            tracked = {k: rec[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s") if k in rec}
            tracked.update({k: v for k, v in (rec.get("objective") or {}).items() if v is not None})  # dpo/…, grpo/…
            self._track(step, tracked)

    def _check_loss_health(self, step: int) -> None:
        """Seed rule on smoothed losses: warn once when the token-weighted mean loss of the last `window` steps is
        not below loss_health_ratio × that of the first `window` steps (single noisy steps decide nothing)."""
        recs = [h for h in self.history if "loss" in h and "event" not in h]
        window = health_window(self.cfg.loss_health_steps)
        initial, current = weighted_mean(recs[:window]), weighted_mean(recs[-window:])
        if current > self.cfg.loss_health_ratio * initial:
            self.health_warned = True
            self.event(step, "loss_health", initial=initial, current=current, window=window,
                       rule=f"smoothed loss (token-weighted mean of {window} steps) did not fall below "
                            f"{self.cfg.loss_health_ratio:.0%} of its initial value within "
                            f"{self.cfg.loss_health_steps} steps: check learning rate and data")

    def _track(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.mlflow is not None:  # train: loss, lr, grad_norm; eval: eval_loss, eval_<metric>
            names = {k: k if prefix == "train" or k.startswith(prefix + "_") else f"{prefix}_{k}" for k in metrics}
            self.mlflow.log_metrics({names[k]: v for k, v in metrics.items()}, step=step)
        if self.wandb is not None:  # train/loss, eval/loss, eval/rouge_l …
            self.wandb.log({f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in metrics.items()}, step=step)

    def eval_record(self, step: int, metrics: dict[str, float]) -> None:
        rec = {"step": step, "event": "eval", **metrics}
        self.history.append(rec)
        self._write(rec)
        if self.is_main:
            self._track(step, metrics, prefix="eval")

    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h and "event" not in h]

    def plot(self, path: Path) -> None:
        if self.is_main:
            plot_losses(self.history, path)

    def close(self, status: str = "FINISHED", png: Path | None = None) -> None:
        """Flush and end every tracker (status FAILED/KILLED on error); loss.png becomes an artifact."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            try:
                if png is not None and png.exists():
                    self.mlflow.log_artifact(str(png))
                last = next((h for h in reversed(self.history) if "loss" in h and "event" not in h), None)
                if last is not None:
                    self.mlflow.set_tag("final_loss", f"{last['loss']:.6g}")
            finally:
                self.mlflow.end_run(status=status)
                self.mlflow = None
        if self.wandb is not None:
            try:
                if png is not None and png.exists():
                    import wandb

                    self.wandb.log({"loss_curve": wandb.Image(str(png))})
            except Exception as err:
                log.warning("dsft train: wandb loss.png not logged: %s", str(err).splitlines()[0])
            finally:
                self.wandb.finish(exit_code=0 if status == "FINISHED" else 1)
                self.wandb = None


def health_window(loss_health_steps: int) -> int:
    """Steps averaged for the loss-health rule: a tenth of its horizon, 1 to 50."""
    return max(1, min(50, loss_health_steps // 10))


def weighted_mean(recs: list[dict]) -> float:
    """Token-weighted mean loss of step records (`tokens` = the step's real tokens; 1 each when absent)."""
    w = [max(1, int(r.get("tokens") or 1)) for r in recs]
    return sum(r["loss"] * n for r, n in zip(recs, w, strict=True)) / max(1, sum(w))


def plot_losses(history: list[dict], path: Path) -> None:
    """loss.png: training loss per step (and eval loss when present)."""
    from dsft.report.plots import pyplot

    plt = pyplot()

    tr = [(h["step"], h["loss"]) for h in history if "loss" in h and "event" not in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if h.get("event") == "eval" and "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
