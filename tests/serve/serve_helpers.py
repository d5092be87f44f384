"""Helpers for the serve tests: plain-transformers greedy references and a near-tie-aware comparison."""

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
