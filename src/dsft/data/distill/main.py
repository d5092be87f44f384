"""`dsft data distill`: read the prompts, sample the pending ones (resumable), verify, mix, report, manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.data.distill import store
from dsft.data.distill.budget import Budget
from dsft.data.distill.mix import mix
from dsft.data.distill.prompts import PromptItem, read_prompts
from dsft.data.distill.report import write_report
from dsft.data.distill.sampler import Session, run_sampling
from dsft.data.distill.teacher import TeacherError, api_key
from dsft.data.distill.verify import verify
from dsft.errors import ConfigError
from dsft.run import RunDir, atomic_write_json, write_jsonl

OUTPUTS = ("samples.jsonl", "teacher.json", "verified.jsonl", "dropped.jsonl", "mixed.jsonl", "distill_report.json",
           "distill_report.html", "distill.png", "manifest.json")


def output_dir(cfg: Config, run_dir: RunDir) -> Path:
    out = Path(cfg.distill.output) if cfg.distill.output else run_dir.root / "distill"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_prompts(done: store.Done, prompts: dict[str, PromptItem], path: Path) -> None:
    for pid, sha in done.ids.items():
        p = prompts.get(pid)
        if p is not None and p.sha != sha:
            raise ConfigError(f"{path}: prompt {pid!r} was sampled with other text than distill.input now gives; "
                              "restore the input to resume, or pass --force to start over")


def run_distill(cfg: Config, run_dir: RunDir, *, force: bool = False, sample: bool = True) -> dict[str, Any]:
    """Sample the prompts not yet in samples.jsonl (unless sample=False), then verify and mix everything sampled so
    far; returns the manifest. force: delete the earlier output first. A TeacherError is raised after the
    completed prompts are verified and reported."""
    dc = cfg.distill
    out = output_dir(cfg, run_dir)
    if force:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    prompts, input_stats = read_prompts(dc, dc.verify.reference)
    by_id = {p.id: p for p in prompts}
    samples_path = out / "samples.jsonl"
    done = store.load(samples_path)
    store.check_fingerprint(out / "teacher.json", dc, bool(done.rows))
    _check_prompts(done, by_id, samples_path)
    budget = Budget(dc.budget, done.prompt_tokens, done.completion_tokens)
    pending = [p for p in prompts if p.id not in done.ids]
    session, fatal = None, None
    if sample and pending:
        key = api_key(dc.teacher)
        try:
            session = run_sampling(pending, dc, out, budget, key)
        except TeacherError as err:
            fatal = err
        torn, done = done.torn_bytes, store.load(samples_path)
        done.torn_bytes = torn
    manifest = finish(cfg, out, prompts, input_stats, done, budget, session)
    if fatal is not None:
        raise fatal
    return manifest


def finish(cfg: Config, out: Path, prompts: list[PromptItem], input_stats: dict[str, Any], done: store.Done,
           budget: Budget, session: Session | None) -> dict[str, Any]:
    """Verify + mix everything sampled so far; write verified/dropped/mixed JSONL, the report and the manifest."""
    dc = cfg.distill
    by_id = {p.id: p for p in prompts}
    kept, dropped, vstats = verify(done.rows, by_id, dc.verify)
    mixed, mstats = mix(kept, dc.mix)
    write_jsonl(out / "verified.jsonl", kept)
    write_jsonl(out / "dropped.jsonl", dropped)
    write_jsonl(out / "mixed.jsonl", mixed)
    n_done = sum(1 for pid in done.ids if pid in by_id)
    stopped = (session.stopped if session else None)
    vstats["accounting_ok"] = vstats["samples"] == vstats["kept"] + sum(vstats["dropped"].values())
    vstats["prompts_with_kept"] = len({r["source"]["prompt_id"] for r in kept})
    rep: dict[str, Any] = {
        "input": {**input_stats, "files": dc.input},
        "sampling": {"teacher": {"model": dc.teacher.model, "base_url": dc.teacher.base_url},
                     "samples_per_prompt": dc.samples_per_prompt, "done": n_done, "pending": len(prompts) - n_done,
                     "complete": n_done == len(prompts), "stopped": stopped, "torn_bytes_cut": done.torn_bytes,
                     "budget": budget.summary(), "session": session.summary() if session else None},
        "verify": vstats, "mix": mstats,
        "files": {"samples": "samples.jsonl", "verified": "verified.jsonl", "dropped": "dropped.jsonl",
                  "mixed": "mixed.jsonl"}}
    files = write_report(out, rep, kept)
    manifest = {"stage": "distill", "out_dir": str(out), "mixed": "mixed.jsonl", "verified": "verified.jsonl",
                "dropped": "dropped.jsonl", "samples": "samples.jsonl", **files,
                "complete": n_done == len(prompts), "prompts": len(prompts), "done": n_done,
                "pending": len(prompts) - n_done, "stopped": stopped,
                "counts": {"samples": vstats["samples"], "kept": vstats["kept"], "dropped": vstats["dropped"]},
                "mix": {k: mstats[k] for k in ("reasoning", "non_reasoning", "share_target", "share_actual")},
                "budget": budget.summary(), "failed": session.summary()["failed_count"] if session else 0}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

