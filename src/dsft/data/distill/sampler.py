"""Sampling: every pending prompt → N teacher samples with bounded concurrency; each completed prompt is appended to
samples.jsonl at once. Stops starting prompts when the budget is spent or a prompt fails after its retries; prompts
already started finish (so the budget may be exceeded by what those cost)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dsft.config.distill import DistillConfig
from dsft.data.distill import store
from dsft.data.distill.budget import Budget
from dsft.data.distill.prompts import PromptItem
from dsft.data.distill.teacher import BadRequest, RetriesExhausted, Teacher, TeacherError
from dsft.data.progress import step_bar


@dataclass
class Session:
    """What one sampling run did."""

    started: int = 0
    completed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    stopped: str | None = None
    seconds: float = 0.0
    teacher: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"started": self.started, "completed": self.completed, "failed": self.failed[:20],
                "failed_count": len(self.failed), "stopped": self.stopped, "seconds": round(self.seconds, 2),
                **self.teacher}


async def _one_prompt(p: PromptItem, n: int, teacher: Teacher, sem: asyncio.Semaphore, state: dict[str, Any]
                      ) -> list[dict[str, Any]]:
    async def one(k: int) -> dict[str, Any]:
        async with sem:
            try:
                s = await teacher.sample(p.messages, k)
            except BadRequest as err:
                if not state["ok"]:  # nothing has worked yet: the request itself is wrong, not this prompt
                    raise TeacherError(f"teacher {teacher.url}: the first request was refused ({err}); check "
                                       "distill.teacher (model, max_tokens, extra_body)") from err
                s = {"reasoning": None, "answer": "", "finish_reason": None, "reasoning_source": None,
                     "unclosed_think": False, "usage": {}, "error": str(err), "attempts": 1}
            else:
                state["ok"] = True
        return {"k": k, **s}

    return list(await asyncio.gather(*(one(k) for k in range(n))))


async def sample_prompts(pending: list[PromptItem], dc: DistillConfig, out: Path, budget: Budget, key: str | None,
                         on_done=None) -> Session:
    """Sample every pending prompt (in input order) until done, the budget is spent, or the teacher fails."""
    t0 = time.monotonic()
    sess = Session()
    limits = httpx.Limits(max_connections=dc.teacher.concurrency, max_keepalive_connections=dc.teacher.concurrency)
    sem = asyncio.Semaphore(dc.teacher.concurrency)
    state: dict[str, Any] = {"ok": False}
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        teacher = Teacher(dc.teacher, client, key)
        tasks: dict[asyncio.Task, PromptItem] = {}
        queue = list(reversed(pending))
        try:
            while queue or tasks:
                # keep enough prompts in flight to fill the request slots, no more (the budget is checked per prompt)
                while queue and len(tasks) * dc.samples_per_prompt < dc.teacher.concurrency + dc.samples_per_prompt \
                        and not sess.stopped:
                    sess.stopped = budget.spent()
                    if sess.stopped:
                        break
                    p = queue.pop()
                    tasks[asyncio.create_task(_one_prompt(p, dc.samples_per_prompt, teacher, sem, state))] = p
                    sess.started += 1
                if not tasks:
                    break
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    p = tasks.pop(task)
                    _finish(task, p, out, budget, sess, dc)
                    if on_done:
                        on_done(sess, budget)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sess.teacher = {"requests": teacher.stats.requests, "retries": teacher.stats.retries,
                            "retry_causes": teacher.stats.retry_causes, "retry_wait_s": round(teacher.stats.waited_s, 2)}
            sess.seconds = time.monotonic() - t0
    return sess


def _finish(task: asyncio.Task, p: PromptItem, out: Path, budget: Budget, sess: Session, dc: DistillConfig) -> None:
    """Append a completed prompt; a prompt whose retries ran out stays pending and stops new prompts."""
    err = task.exception()
    if isinstance(err, RetriesExhausted):
        sess.failed.append({"prompt_id": p.id, "error": str(err)})
        sess.stopped = sess.stopped or f"the teacher kept failing ({err}) on prompt {p.id}"
        return
    if err is not None:
        raise err
    samples = task.result()
    for s in samples:
        budget.add(s["usage"])
    store.append(out / "samples.jsonl", {"prompt_id": p.id, "prompt_sha": p.sha, "index": p.index,
                                         "teacher": dc.teacher.model, "samples": samples})
    sess.completed += 1


def run_sampling(pending: list[PromptItem], dc: DistillConfig, out: Path, budget: Budget, key: str | None) -> Session:
    """sample_prompts with a progress bar on a terminal (prompts, tokens, cost)."""
    bar = step_bar("distill", total=len(pending))

    def on_done(sess: Session, b: Budget) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{b.tokens:,} tok" + (f", {b.cost:.2f} {b.cfg.currency}" if b.cost else ""))

    try:
        return asyncio.run(sample_prompts(pending, dc, out, budget, key, on_done))
    finally:
        bar.close()
