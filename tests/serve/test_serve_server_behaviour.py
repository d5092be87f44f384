"""Auth, overload 429, cancellation on disconnect, graceful shutdown, R1 reasoning split — on live servers."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest

from dsft.config import ServeConfig
from dsft.serve import serve_in_background
from dsft.serve.reasoning import ReasoningStream, split_reasoning


def _metric(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", httpx.get(f"{url}/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def test_api_key_required_when_set(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DSFT_API_KEY", "s3cret")
    with serve_in_background(str(tiny_model_dir), ServeConfig(port=0, served_model_name="tiny")) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # probes stay open
        r = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices
        r = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_overload_is_429_with_retry_after_and_no_5xx(tiny_model_dir):
    cfg = ServeConfig(port=0, max_batch_size=1, max_queue=1, served_model_name="tiny")
    with serve_in_background(str(tiny_model_dir), cfg) as url:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*[
                    c.post(f"{url}/generate", json={"prompt": "头痛", "max_tokens": 40, "temperature": 0}) for _ in range(8)])

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        limited = next(r for r in rs if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["type"] == "RateLimitError"
        with pytest.raises(openai.RateLimitError):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
            errs = []

            def call():
                try:
                    client.completions.create(model="tiny", prompt="x", max_tokens=60)
                except openai.RateLimitError as e:
                    errs.append(e)

            ts = [threading.Thread(target=call) for _ in range(6)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            if errs:
                raise errs[0]
        assert _metric(url, "dsft_rejected_requests_total") >= 1


def test_client_disconnect_cancels_generation(server):
    before = _metric(server, "dsft_generation_tokens_total")
    cancelled = _metric(server, "dsft_cancelled_requests_total")
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "头痛", "max_tokens": 2000, "temperature": 0, "stream": True}) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
    deadline = time.monotonic() + 20
    while _metric(server, "dsft_running_requests") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "dsft_running_requests") == 0
    produced = _metric(server, "dsft_generation_tokens_total") - before
    assert produced < 1500, produced  # stopped well before the 2000 asked for
    assert _metric(server, "dsft_cancelled_requests_total") == cancelled + 1  # a streaming disconnect counts too


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model_dir):
    results = {}
    with serve_in_background(str(tiny_model_dir), ServeConfig(port=0)) as url:
        def call():
            r = httpx.post(f"{url}/generate", json={"prompt": "头痛", "max_tokens": 150, "temperature": 0}, timeout=120)
            results["r"] = r

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 30
        while _metric(url, "dsft_running_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # leaving the block asks uvicorn to exit while the request is still generating
    t.join(60)
    r = results["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert r.json()["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("text, think_open, reasoning, content", [
    ("<think>\nfirst, fever</think>\n\n多喝水", False, "\nfirst, fever", "多喝水"),
    ("plain answer", False, None, "plain answer"),
    ("fever reasoning</think>answer", True, "fever reasoning", "answer"),
    ("<think>never closed", False, "never closed", ""),
    ("<thinking is not a tag", False, None, "<thinking is not a tag"),
])
def test_reasoning_split_whole_and_streamed_agree(text, think_open, reasoning, content):
    assert split_reasoning(text, think_open) == (reasoning, content)
    for step in (1, 2, 3, 5):  # any chunking of the stream gives the same split
        rs = ReasoningStream(think_open)
        pieces = []
        for i in range(0, len(text), step):
            pieces += rs.feed(text[i:i + step])
        pieces += rs.flush()
        got_r = "".join(t for f, t in pieces if f == "reasoning_content")
        got_c = "".join(t for f, t in pieces if f == "content")
        assert (got_r if reasoning is not None else None, got_c) == (reasoning, content), step


@pytest.fixture(scope="module")
def r1_model_dir(tmp_path_factory):
    """The tiny model with DeepSeek-R1's template, overfitted to answer one question with <think>…</think>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.model.templates import get_template
    from dsft.model.tiny import build_tiny_deepseek_v3

    d = build_tiny_deepseek_v3(tmp_path_factory.mktemp("r1") / "tiny-r1", seed=0)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = get_template("deepseek-r1")
    model = AutoModelForCausalLM.from_pretrained(str(d))
    prompt = tok.apply_chat_template([{"role": "user", "content": "头痛怎么办"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<think>\n")  # R1's template opens the reasoning block itself
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok("先想想发烧</think>\n\n多喝水" + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    labels = ids.clone()
    labels[0, : len(p)] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(45):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def test_r1_think_block_becomes_reasoning_content(r1_model_dir):
    with serve_in_background(str(r1_model_dir), ServeConfig(port=0, served_model_name="r1")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="r1", messages=[{"role": "user", "content": "头痛怎么办"}], max_tokens=30, temperature=0)
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert msg.content == "多喝水" and msg.reasoning_content == "先想想发烧" and r.choices[0].finish_reason == "stop"
        deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "先想想发烧"
        assert "".join(d.content or "" for d in deltas) == "多喝水"
        # the seed's /generate returns the raw text
        g = httpx.post(f"{url}/generate", json={"prompt": "头痛怎么办", "max_tokens": 30, "temperature": 0}, timeout=60)
        assert g.json()["text"] == "先想想发烧</think>\n\n多喝水"
