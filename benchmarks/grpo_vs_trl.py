"""dsft GRPO vs TRL's GRPOTrainer on the same tiny model, prompts, G, lengths, steps and learning rate.

Both start from the same warm model (the embedded tiny DeepSeek-V3 after a short full SFT on the toy task's format,
as in tests/train/test_grpo.py), train fully (no adapters) with β = 0.1, the dapo loss, 8 prompts × G = 8
completions of ≤ 8 tokens per step, and score with the same reward (dsft.rewards.numeric, extract=False). Each
trainer runs in its own process (peak RSS is per process). Prints a table; the last line is JSON with the ratios
(speed = TRL seconds per step / dsft seconds per step).

Two clocks: `s/step` is the whole timed call over the steps (dsft: `train()`, which also loads the model and
tokenizer, saves the model and draws the plots; TRL: `trainer.train()`, its model, tokenizer and trainer built before
the clock starts); `loop s/step` is the steady state, from the start of step 2 to the start of the last step over
steps − 2 (dsft: the loop's hook before each step's forward, after the step's sampling; TRL: on_step_begin), so
one-off costs drop out of it. CPU seconds (this process, all threads) are taken at the same points: on a shared
machine they move less with other jobs' load than wall time does.

    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py [--steps 18] [--out runs/bench_grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))

G, PROMPTS, MAX_NEW, LR, BETA = 8, 8, 8, 1e-3, 0.1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Wall and CPU time at each step's start; the steady state is the mean over the steps between 2 and the last."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def mark(self, *_: Any, **__: Any) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def steady(self) -> dict[str, float]:
        (w0, c0), (w1, c1) = self.marks[1], self.marks[-1]
        n = max(1, len(self.marks) - 2)
        return {"loop_s_per_step": (w1 - w0) / n, "loop_cpu_s_per_step": (c1 - c0) / n}


def run_dsft(out: Path, warm: Path, steps: int) -> dict:
    from pref_helpers import grpo_cfg, toy_prompts
    from train_helpers import make_run

    from dsft.train import train

    run = make_run(out / "dsft", toy_prompts(24))
    cfg = grpo_cfg(out / "dsft", warm)
    cfg.train.max_steps = steps
    clock = StepClock()  # one micro-batch per step: the hook runs once per step, after the step's sampling
    t, c = time.perf_counter(), time.process_time()
    train(cfg, run, force=True, fault_hook=clock.mark)
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    log = [json.loads(x) for x in (out / "dsft/train/log.jsonl").read_text().splitlines()]
    rewards = [x["objective"]["grpo/reward"] for x in log if "objective" in x]
    return {"seconds": secs, "cpu_seconds": cpu, "rewards": rewards, **clock.steady()}


def run_trl(out: Path, warm: Path, steps: int) -> dict:
    from datasets import Dataset
    from pref_helpers import toy_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dsft.rewards import numeric

    recs = toy_prompts(24)
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in recs])

    def reward(completions, answer, **_):
        return [numeric(c[-1]["content"] if isinstance(c, list) else c, {"answer": a}, extract=False)
                for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, learning_rate=LR, lr_scheduler_type="constant",
                      warmup_steps=0, beta=BETA, loss_type="dapo", temperature=1.0, max_steps=steps,
                      logging_steps=1, report_to=[], use_cpu=True, bf16=False, disable_dropout=True, save_strategy="no",
                      seed=42)
    model = AutoModelForCausalLM.from_pretrained(str(warm))
    tok = AutoTokenizer.from_pretrained(str(warm))
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            clock.mark()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    t, c = time.perf_counter(), time.process_time()
    trainer.train()
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"seconds": secs, "cpu_seconds": cpu, "rewards": rewards, **clock.steady()}


def child(which: str, out: Path, warm: Path, steps: int) -> None:
    res = (run_dsft if which == "dsft" else run_trl)(out, warm, steps)
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_grpo")
    ap.add_argument("--child", choices=["dsft", "trl"])
    ap.add_argument("--warm", type=Path)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.out, a.warm, a.steps)
        return
    from pref_helpers import warm_model

    warm = a.out / "warm" / "train" / "model"
    if not (warm / "config.json").exists():
        warm_model(a.out / "warm")
    res = {}
    for which in ("dsft", "trl"):
        p = subprocess.run([sys.executable, __file__, "--child", which, "--out", str(a.out), "--warm", str(warm),
                            "--steps", str(a.steps)], capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            sys.exit(f"{which} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        res[which] = json.loads(line[7:])
    rows = []
    for which, r in res.items():
        rw = r["rewards"]
        r["s_per_step"] = r["seconds"] / a.steps
        r["final_reward"] = sum(rw[-3:]) / len(rw[-3:])
        rows.append(f"{which:5} {r['s_per_step']:6.2f} s/step (CPU {r['cpu_seconds'] / a.steps:.2f})  loop "
                    f"{r['loop_s_per_step']:.2f} s/step (CPU {r['loop_cpu_s_per_step']:.2f})  peak RSS {r['peak_rss_mb']:7.0f} MB  reward "
                    f"{rw[0]:.2f} → {r['final_reward']:.2f} (mean of the last 3 steps)  curve "
                    f"{' '.join(f'{x:.2f}' for x in rw)}")
    print(f"GRPO, {a.steps} steps × {PROMPTS} prompts × G={G}, ≤ {MAX_NEW} new tokens, full fine-tuning, β={BETA}, "
          f"tiny DeepSeek-V3, CPU")
    print("\n".join(rows))
    print(json.dumps({"benchmark": "grpo_vs_trl", "steps": a.steps,
                      "speedup_per_step": round(res["trl"]["s_per_step"] / res["dsft"]["s_per_step"], 3),
                      "speedup_cpu_per_step": round(res["trl"]["cpu_seconds"] / res["dsft"]["cpu_seconds"], 3),
                      "speedup_loop_per_step": round(res["trl"]["loop_s_per_step"] / res["dsft"]["loop_s_per_step"], 3),
                      "speedup_loop_cpu_per_step": round(res["trl"]["loop_cpu_s_per_step"]
                                                         / res["dsft"]["loop_cpu_s_per_step"], 3),
                      "dsft_s_per_step": round(res["dsft"]["s_per_step"], 3),
                      "trl_s_per_step": round(res["trl"]["s_per_step"], 3),
                      "dsft_loop_s_per_step": round(res["dsft"]["loop_s_per_step"], 3),
                      "trl_loop_s_per_step": round(res["trl"]["loop_s_per_step"], 3),
                      "load_average": [round(x, 2) for x in os.getloadavg()],
                      "peak_rss_ratio": round(res["dsft"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"], 3),
                      "final_reward_dsft": round(res["dsft"]["final_reward"], 3),
                      "final_reward_trl": round(res["trl"]["final_reward"], 3)}))


if __name__ == "__main__":
    main()
