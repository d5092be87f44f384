"""Helpers for the serve tests: greedy references, a near-tie-aware comparison, streams under bad requests."""

from __future__ import annotations


def greedy_reference(model_dir, prompt: str, n: int, adapter_dir=None, chat_template=None, raw: bool = False):
    """Plain transformers greedy decoding of a chat prompt → (token ids, top-2 logit gap at each step, tokenizer).

    chat_template: a template overriding the tokenizer's; raw: `prompt` is a completion prompt (no template,
    tokenized with the tokenizer's special tokens, as /v1/completions does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    if raw:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    else:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False,
                                       chat_template=chat_template)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, output_scores=True,
                             return_dict_in_generate=True)
    toks = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return toks, gaps, tok


NEAR_TIE = 1e-3


def assert_greedy_matches(got: str, ref, tol: float = NEAR_TIE) -> None:
    """got (server text) equals the reference greedy text, or first departs from it where the reference's
    top-2 logits are a near-tie (batched matmuls may round differently than one-at-a-time ones)."""
    toks, gaps, tok = ref
    toks = [t for t in toks if t != tok.eos_token_id]
    want = tok.decode(toks, skip_special_tokens=True).rstrip("\ufffd")
    if got == want:
        return
    k = next((i for i in range(len(toks))
              if not got.startswith(tok.decode(toks[: i + 1], skip_special_tokens=True).rstrip("\ufffd"))), len(toks) - 1)
    assert gaps[k] < tol, f"output departs at token {k}, where the top-2 logit gap is {gaps[k]:.2e}: {got!r} != {want!r}"


def wait_healthy(url: str, timeout_s: float = 120, proc=None, poll_s: float = 0.1) -> None:
    """Poll GET {url}/health until 200; fail if it takes longer than timeout_s or the server process died."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url}/health did not answer 200 within {timeout_s} s"
        assert proc is None or proc.poll() is None, "the server process exited"
        time.sleep(poll_s)


STREAM_PROMPTS = ["头痛怎么办", "发烧三天了", "胃疼，恶心"]
# requests that reached the engine (or the tokenizer) before validation was complete, and came back as 500s
BAD_DURING_STREAMS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": [""]}),
    ("/v1/completions", {"prompt": [10**30]}),
    ("/generate", {"prompt": "x", "stop": ["a"] * 17}),
]


def _stream(url: str, prompt: str) -> list[str]:
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def bad_requests_during_three_streams(url: str) -> tuple[list[int], list[list[str]]]:
    """Three greedy chat streams, and the BAD_DURING_STREAMS requests sent over and over while they run:
    (statuses of the bad requests, SSE lines of each stream)."""
    import concurrent.futures as cf

    import httpx

    with cf.ThreadPoolExecutor(3) as ex:
        streams = [ex.submit(_stream, url, p) for p in STREAM_PROMPTS]
        bad = []
        for _ in range(50):
            for path, body in BAD_DURING_STREAMS:
                bad.append(httpx.post(f"{url}{path}", json=body, timeout=60).status_code)
            if any(f.done() for f in streams):
                break
        return bad, [f.result() for f in streams]


def assert_streams_complete(lines: list[list[str]]) -> list[str]:
    """Each stream ends with a finish_reason and [DONE] and carries no error; returns the streamed texts."""
    import json

    texts = []
    for got in lines:
        assert got[-1] == "data: [DONE]" and not any('"error"' in x for x in got), got[-3:]
        chunks = [json.loads(x.removeprefix("data: ")) for x in got[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))
    return texts
