"""Loss-health rule on synthetic curves: noise and short packed steps must not decide it, the smoothed trend must."""

import random
from pathlib import Path
from types import SimpleNamespace

from dsft.train.monitor import Monitor


def _curve(final_fraction: float, *, seed: int = 0, steps: int = 1000) -> list[dict]:
    """Losses falling linearly from 9.0 to final_fraction × 9.0 with noise; every 37th step is a short packed step
    (40 tokens instead of ~3000) whose loss is far below the trend, like the demo's step 103 (loss 2.11)."""
    rng = random.Random(seed)
    recs = []
    for step in range(1, steps + 1):
        trend = 9.0 * (1 - (1 - final_fraction) * step / steps)
        if step % 37 == 0:
            recs.append({"step": step, "loss": 2.0 + rng.random() * 0.2, "tokens": 40})
        else:
            recs.append({"step": step, "loss": trend + rng.gauss(0, 0.8), "tokens": 2900 + rng.randrange(200)})
    return recs


def _run(recs: list[dict]) -> list[dict]:
    cfg = SimpleNamespace(loss_health_steps=1000, loss_health_ratio=0.3, grad_spike_factor=10.0, logging_steps=10**9)
    mon = Monitor(Path("unused"), cfg, is_main=False)  # not the main rank: no files, no trackers
    for rec in recs:
        mon.step(dict(rec))
    return [h for h in mon.history if h.get("event") == "loss_health"]


def test_noisy_curve_still_at_58_percent_warns_although_single_steps_dip_below_30_percent():
    recs = _curve(0.58)
    assert min(r["loss"] for r in recs) < 0.3 * recs[0]["loss"]  # the old single-step rule would stay silent
    events = _run(recs)
    assert len(events) == 1 and events[0]["step"] == 1000
    assert 0.5 < events[0]["current"] / events[0]["initial"] < 0.7


def test_clean_curve_that_reaches_20_percent_does_not_warn_despite_noise():
    for seed in range(3):
        assert _run(_curve(0.2, seed=seed)) == []


def test_the_rule_waits_for_its_horizon():
    assert _run(_curve(0.9, steps=999)) == []
