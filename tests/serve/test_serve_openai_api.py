"""OpenAI-compatible API on a live server with the real `openai` SDK: chat, streaming, completions, models, errors."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
from serve_helpers import assert_greedy_matches, greedy_reference


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_chat_completion(client):
    r = _chat(client, "头痛怎么办？", max_tokens=10, temperature=0.7)
    assert r.object == "chat.completion" and r.model == "tiny"
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming_with_usage(client):
    plain = _chat(client, "发烧了", max_tokens=12, temperature=0)
    stream = _chat(client, "发烧了", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == plain.choices[0].message.content
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_raw_sse_framing(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


def test_completions_plain_and_streaming(client):
    r = client.completions.create(model="tiny", prompt="头痛的原因有", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="tiny", prompt="头痛的原因有", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_stop_strings_cut_the_output(client):
    full = _chat(client, "请介绍一下高血压", max_tokens=24, temperature=0).choices[0].message.content
    assert len(full) >= 6
    stop = full[3:5]
    cut = _chat(client, "请介绍一下高血压", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       _chat(client, "请介绍一下高血压", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.find(stop)]


def test_seed_reproduces_sampling_and_top_p_tiny_is_greedy(client):
    a = _chat(client, "胃疼", max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
    b = _chat(client, "胃疼", max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
    c = _chat(client, "胃疼", max_tokens=16, temperature=1.0, seed=99).choices[0].message.content
    assert a == b and a != c
    greedy = _chat(client, "胃疼", max_tokens=16, temperature=0).choices[0].message.content
    nucleus = _chat(client, "胃疼", max_tokens=16, temperature=1.0, top_p=1e-6, seed=5).choices[0].message.content
    assert nucleus == greedy


def test_error_classes(client, server):
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e404.value.status_code == 404 and "nope" in e404.value.message
    with pytest.raises(openai.BadRequestError) as e400:
        _chat(client, "hi", max_tokens=2, temperature=5)
    assert e400.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        _chat(client, "hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError) as elp:  # refused clearly rather than silently ignored
        _chat(client, "hi", max_tokens=2, logprobs=True)
    assert elp.value.body["param"] == "logprobs" and "not supported" in elp.value.message
    with pytest.raises(openai.BadRequestError) as ectx:
        _chat(client, "头痛" * 3000, max_tokens=2)
    assert "maximum context length" in ectx.value.message
    with pytest.raises(openai.BadRequestError) as emax:
        _chat(client, "hi", max_tokens=100_000)
    assert emax.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as emsg:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert emsg.value.body["param"] == "messages"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")


def test_concurrent_greedy_requests_match_plain_generate(client, tiny_model_dir):
    prompts = ["头痛", "发烧三天了，应该吃什么药？请详细说明一下", "hi", "胃疼，恶心", "咳嗽", "失眠多梦怎么办", "腰疼", "血压高"]
    lens = [6, 14, 9, 12, 5, 16, 7, 11]
    with cf.ThreadPoolExecutor(8) as ex:
        par = list(ex.map(lambda pn: _chat(client, pn[0], max_tokens=pn[1], temperature=0).choices[0].message.content,
                          zip(prompts, lens, strict=True)))
    for p, n, got in zip(prompts, lens, par, strict=True):
        assert_greedy_matches(got, greedy_reference(tiny_model_dir, p, n))


def test_metrics_are_prometheus_text(server, client):
    _chat(client, "hi", max_tokens=2)
    body = httpx.get(f"{server}/metrics").text
    for name in ("dsft_requests_total", "dsft_request_latency_seconds_bucket", "dsft_time_to_first_token_seconds_count",
                 "dsft_generation_tokens_total", "dsft_generation_tokens_per_second", "dsft_queue_depth",
                 "dsft_running_requests"):
        assert name in body, name
    assert 'dsft_requests_total{path="/v1/chat/completions",status="200"}' in body


def test_completions_token_ids_echo_and_context_errors(client, server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok("头痛的原因有", add_special_tokens=False)["input_ids"]
    by_text = client.completions.create(model="tiny", prompt="头痛的原因有", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model="tiny", prompt="头痛的原因有", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "头痛的原因有" + by_text.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="头痛" * 3000, max_tokens=2)
    assert e.value.body["param"] == "prompt"
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": [10**9], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{server}/generate", json={"prompt": "头痛" * 3000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
