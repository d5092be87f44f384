"""Serving benchmark: the demo model behind `dsft serve` (concurrency 1/4/8) vs a sequential `model.generate` loop.

Same prompts (real questions from the embedded medical QA subset, DeepSeek chat template), same greedy
decoding and max tokens. The server runs in its own process (as in production) and is called over real
HTTP on loopback with streaming chat completions (time to first token = first content chunk).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/serve_load.py [--prompts 32] [--max-tokens 64]

Last line: JSON {"sequential_tokens_per_s", "dsft_tokens_per_s_c8", "ratio", "p95_latency_s_c8"}.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(n: int) -> list[str]:
    from dsft.model.paths import assets_dir

    text = (assets_dir() / "data" / "medical_qa_subset.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(text)))
    return [(r["title"] + "\n" + r["ask"]).strip()[:200] for r in rows[:n]]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def sequential(model_dir: str, prompts: list[str], max_tokens: int) -> dict:
    """The peer: one `model.generate` call per prompt, one after another."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(input_ids=enc[0], attention_mask=torch.ones_like(enc[0]), max_new_tokens=4, **kw)  # warm-up
        ttft = []
        for ids in enc[: min(8, len(enc))]:  # time to first token: prefill + one token
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, **kw)
            ttft.append(time.perf_counter() - t)
        lat, toks = [], 0
        t0 = time.perf_counter()
        for ids in enc:
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, **kw)
            lat.append(time.perf_counter() - t)
            toks += out.shape[1] - ids.shape[1]
        wall = time.perf_counter() - t0
    return {"requests_per_s": len(enc) / wall, "tokens_per_s": toks / wall, "tokens": toks, "wall_s": wall,
            "p50_latency_s": pct(lat, 0.5), "p95_latency_s": pct(lat, 0.95), "ttft_s": statistics.median(ttft)}


async def _one(c: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    first, n = None, 0
    async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if first is None and ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    lat = time.perf_counter() - t
    return lat, (first if first is not None else lat), n


async def _load(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def run(p):
            async with sem:
                return await _one(c, url, p, max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*[run(p) for p in prompts])
        wall = time.perf_counter() - t0
    lat, ttft, toks = [r[0] for r in res], [r[1] for r in res], sum(r[2] for r in res)
    return {"requests_per_s": len(prompts) / wall, "tokens_per_s": toks / wall, "tokens": toks, "wall_s": wall,
            "p50_latency_s": pct(lat, 0.5), "p95_latency_s": pct(lat, 0.95), "ttft_s": statistics.median(ttft)}


def start_server(model_dir: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "dsft", "serve", "--model", model_dir, "--port", "0",
                             "--served-model-name", "bench", "--max-batch-size", str(max_batch), "--max-queue", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    m = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("server did not print its URL")
    url = m.group(0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny-deepseek-v3", help="model folder (default: the demo model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    from dsft.model.load import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    prompts = load_prompts(args.prompts)
    print(f"model {model_dir}; {len(prompts)} prompts; greedy, max_tokens={args.max_tokens}; "
          f"torch threads via OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    seq_before = sequential(model_dir, prompts, args.max_tokens)
    proc, url = start_server(model_dir, max_batch=8)
    try:
        asyncio.run(_load(url, prompts[:4], 4, 4))  # warm-up
        res = {c: asyncio.run(_load(url, prompts, args.max_tokens, c)) for c in (1, 4, 8)}
    finally:
        proc.terminate()
        proc.wait(60)
    # the peer runs before and after the server (a shared CPU's load drifts): report the mean of both runs
    seq_after = sequential(model_dir, prompts, args.max_tokens)
    seq = {k: (seq_before[k] + seq_after[k]) / 2 for k in seq_before}
    print(f"sequential tokens/s before / after the server runs: {seq_before['tokens_per_s']:.1f} / "
          f"{seq_after['tokens_per_s']:.1f}")
    cols = ["requests_per_s", "tokens_per_s", "p50_latency_s", "p95_latency_s", "ttft_s"]
    print(f"{'':26}" + "".join(f"{c:>16}" for c in cols))
    print(f"{'sequential model.generate':26}" + "".join(f"{seq[c]:>16.3f}" for c in cols))
    for c, r in res.items():
        print(f"{f'dsft serve, concurrency {c}':26}" + "".join(f"{r[k]:>16.3f}" for k in cols))
    for c, r in res.items():
        print(f"ratio tokens/s dsft c{c} / sequential: {r['tokens_per_s'] / seq['tokens_per_s']:.2f}x")
    print(json.dumps({"sequential_tokens_per_s": round(seq["tokens_per_s"], 2),
                      "dsft_tokens_per_s_c8": round(res[8]["tokens_per_s"], 2),
                      "ratio": round(res[8]["tokens_per_s"] / seq["tokens_per_s"], 2),
                      "p95_latency_s_c8": round(res[8]["p95_latency_s"], 3)}))


if __name__ == "__main__":
    main()
