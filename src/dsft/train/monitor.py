"""Training monitors: log.jsonl, TensorBoard/MLflow/W&B, loss-health rule, NaN stop, grad-norm spikes, loss.png."""

from __future__ import annotations

import json
import logging
import math
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
                raise TrainError("train.report_to lists mlflow but it is not installed (pip install mlflow)") from err
            self.mlflow = mlflow
        if "wandb" in report:
            try:
                import wandb
            except ImportError as err:
                raise TrainError("train.report_to lists wandb but it is not installed (pip install wandb)") from err
            self.wandb = wandb.init(project="dsft", dir=str(self.dir), resume="allow")

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
            first = losses[0]
            if min(losses + [loss]) > self.cfg.loss_health_ratio * first:
                self.health_warned = True
                self.event(step, "loss_health", initial=first, best=min(losses + [loss]),
                           rule=f"loss did not fall below {self.cfg.loss_health_ratio:.0%} of its initial value "
                                f"within {self.cfg.loss_health_steps} steps: check learning rate and data")
        if step % self.cfg.logging_steps == 0 or step == 1:
            self._track(step, {k: rec[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s") if k in rec})

    def _track(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"{prefix}_{k}": v for k, v in metrics.items()}, step=step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(history: list[dict], path: Path) -> None:
    """loss.png: training loss per step (and eval loss when present)."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
