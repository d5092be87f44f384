"""Continuous-batching engine: staggered joins give the same greedy tokens as plain `generate`, per architecture."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_helpers import NEAR_TIE, greedy_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsft.model.tokenizer import embedded_tokenizer_dir
from dsft.serve.engine import Engine, SamplingParams, Sequence

PROMPTS = ["头痛怎么办", "发烧三天了，应该吃什么药？请详细说明一下", "hi", "胃疼，恶心，呕吐，已经两天了"]
LENS = [12, 5, 9, 16]


def _tiny(kind: str, out):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dsft.model.tiny import build_tiny_deepseek_v3

    if kind == "deepseek_v3":
        return build_tiny_deepseek_v3(out, seed=0)
    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _run(engine: Engine, tok, stagger: float) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in PROMPTS]
    done = [threading.Event() for _ in PROMPTS]
    seqs = []
    for i, (p, n) in enumerate(zip(PROMPTS, LENS, strict=True)):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]

        def emit(ev, i=i):
            if ev.kind in ("finish", "error"):
                done[i].set()

        s = Sequence(ids, SamplingParams(max_tokens=n, temperature=0), emit)
        seqs.append(s)
        engine.submit(s)
        time.sleep(stagger)
    for i, d in enumerate(done):
        assert d.wait(120)
        outs[i] = list(seqs[i].gen_ids)
    return outs


@pytest.mark.parametrize("kind", ["deepseek_v3", "llama", "qwen2"])
def test_staggered_batch_equals_generate(kind, tmp_path):
    d = _tiny(kind, tmp_path / kind)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    refs = [greedy_reference(d, p, n) for p, n in zip(PROMPTS, LENS, strict=True)]
    engine = Engine(model, tok, max_batch_size=3)  # 4 requests, 3 slots: one waits, then joins mid-flight
    engine.start()
    try:
        for stagger in (0.0, 0.01):
            for got, (want, gaps, _) in zip(_run(engine, tok, stagger), refs, strict=True):
                want = [t for t in want if t != tok.eos_token_id]
                if got != want:  # only where one-at-a-time decoding had a near-tie may a batch pick the other token
                    k = next(i for i in range(min(len(got), len(want)) + 1) if got[: i + 1] != want[: i + 1])
                    assert gaps[k] < NEAR_TIE, f"token {k}: gap {gaps[k]:.2e}, {got} != {want}"
        assert engine.max_rows_seen >= 2
        assert engine.running == 0 and engine._cache is None  # batch state released when idle
    finally:
        engine.stop()


@pytest.mark.parametrize("name", ["embedded", "deepseek-v3", "deepseek-llm-7b-base"])
def test_engine_encode_equals_the_tokenizer(name):
    """engine.encode (the fast tokenizer's GIL-free batch call, used off the event loop) gives tok(text)'s ids."""
    from dsft.model.tokenizer import load_tokenizer
    from dsft.serve.engine import encode

    tok = load_tokenizer(name)
    for text in ["头痛、发烧三天，应该怎么办？", " leading space and  double", "<｜User｜>hi<｜Assistant｜>", "", "123 abc 😀"]:
        for special in (True, False):
            assert encode(tok, text, add_special_tokens=special) == tok(text, add_special_tokens=special)["input_ids"]
