"""One bad request never fails another: bad input is a 400 before the engine, and an engine failure ends
only the request that caused it (HTTP level on a live server, and inside the engine with real faults)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from serve_helpers import (
    NEAR_TIE,
    STREAM_PROMPTS,
    assert_greedy_matches,
    assert_streams_complete,
    bad_requests_during_three_streams,
    greedy_reference,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsft.serve.engine import Engine, SamplingParams, Sequence

CHAT = {"messages": [{"role": "user", "content": "头痛怎么办"}], "max_tokens": 4}
# every one of these reached the engine (or the tokenizer) before, and came back as a 500
BAD = [
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [10**30]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**40}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999999999999999": 100}}, "logit_bias"),
    ("/generate", {"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ("/generate", {"prompt": "x", "stop": "a" * 257}, "stop"),
    ("/generate", {"prompt": "x", "seed": 2**64}, "seed"),
]
RAW_BAD = [  # bodies Python's json module accepts but are not JSON, or that overflow a parser
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate no tokenizer can encode
    b"[" * 100_000,
]


@pytest.mark.parametrize("path, body, param", BAD)
def test_bad_values_are_400_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and len(r.json()["error"]["message"]) < 400


@pytest.mark.parametrize("raw", RAW_BAD, ids=["nan", "infinity", "huge-int", "lone-surrogate", "deep-nesting"])
def test_malformed_bodies_are_400(server, raw):
    r = httpx.post(f"{server}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == 400


def test_bad_requests_while_three_streams_run_leave_them_complete(server, tiny_model_dir):
    bad, lines = bad_requests_during_three_streams(server)
    assert bad and set(bad) == {400}
    for text, prompt in zip(assert_streams_complete(lines), STREAM_PROMPTS, strict=True):
        assert_greedy_matches(text, greedy_reference(tiny_model_dir, prompt, 40))


# ---- inside the engine: real faults, injected past the API's validation ------------------------------------------
PROMPTS = ["头痛怎么办", "发烧三天了，应该吃什么药？", "胃疼，恶心，呕吐"]
N = 12


@pytest.fixture(scope="module")
def engine_parts(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    refs = [greedy_reference(tiny_model_dir, p, N) for p in PROMPTS]
    return tok, model, refs


def _ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _submit(engine: Engine, ids: list[int], params: SamplingParams) -> tuple[Sequence, list, threading.Event]:
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if ev.kind in ("finish", "error"):
            done.set()

    seq = Sequence(ids, params, emit)
    engine.submit(seq)
    return seq, events, done


def _assert_greedy(seq: Sequence, events: list, ref, tok) -> None:
    assert [e.kind for e in events][-1] == "finish" and not [e for e in events if e.kind == "error"]
    want = [t for t in ref[0] if t != tok.eos_token_id]
    got = seq.gen_ids
    if got != want:  # batched rounding may flip a near-tie only
        k = next(i for i in range(min(len(got), len(want)) + 1) if got[: i + 1] != want[: i + 1])
        assert ref[1][k] < NEAR_TIE, f"token {k}: {got} != {want}"


class FailOnce(torch.nn.Module):
    """The real model, except that its forward raises once when `armed` (a fault in the middle of a batch)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.generation_config = model, model.config, model.generation_config
        self.armed = False

    def get_base_model(self):
        return self.inner

    def forward(self, **kwargs):
        ids = kwargs["input_ids"]
        if self.armed and ids.shape[0] > 1 and ids.shape[1] == 1:  # a decode step of several rows
            self.armed = False
            raise RuntimeError("injected fault in a batched decode step")
        return self.inner(**kwargs)


@pytest.mark.parametrize("fault", ["token id past the vocabulary", "NaN temperature"])
def test_a_request_that_breaks_the_engine_fails_alone(engine_parts, fault):
    tok, model, refs = engine_parts
    engine = Engine(model, tok, max_batch_size=4)
    engine.start()
    try:
        good = [_submit(engine, _ids(tok, p), SamplingParams(max_tokens=N, temperature=0)) for p in PROMPTS]
        if fault.startswith("token"):  # embedding lookup fails inside the (batched) prefill
            bad = _submit(engine, _ids(tok, "hi") + [len(tok) + 10_000], SamplingParams(max_tokens=N, temperature=0))
        else:  # sampling fails for this row only
            bad = _submit(engine, _ids(tok, "hi"), SamplingParams(max_tokens=N, temperature=float("nan")))
        for _, _, done in [*good, bad]:
            assert done.wait(120)
        assert bad[1][-1].kind == "error" and "generation failed" in bad[1][-1].text
        for (seq, events, _), ref in zip(good, refs, strict=True):
            _assert_greedy(seq, events, ref, tok)
    finally:
        engine.stop()


def test_a_failed_batched_decode_step_is_retried_row_by_row(engine_parts):
    tok, model, refs = engine_parts
    flaky = FailOnce(model)
    engine = Engine(flaky, tok, max_batch_size=4)
    engine.start()
    try:
        good = [_submit(engine, _ids(tok, p), SamplingParams(max_tokens=N, temperature=0)) for p in PROMPTS]
        deadline = time.monotonic() + 60
        while engine.running < 2 and time.monotonic() < deadline:  # arm the fault once several rows decode
            time.sleep(0.001)
        flaky.armed = True
        for _, _, done in good:
            assert done.wait(120)
        assert not flaky.armed  # the fault did fire
        for (seq, events, _), ref in zip(good, refs, strict=True):
            _assert_greedy(seq, events, ref, tok)
    finally:
        engine.stop()
