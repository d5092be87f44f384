"""Tokenization for SFT: DeepSeek template, labels only on assistant tokens, broken/truncated data refused."""

from __future__ import annotations

import pytest

from dsft.errors import DataError, TrainError
from dsft.model.tokenizer import load_tokenizer
from dsft.train.encode import IGNORE, encode_messages, encode_records


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def test_labels_cover_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛怎么办？"},
            {"role": "assistant", "content": "多休息，多喝水。"}, {"role": "user", "content": "还要吃药吗？"},
            {"role": "assistant", "content": "必要时服用布洛芬。"}]
    ids, labels, truncated, _ = encode_messages(tok, msgs, 512)
    assert not truncated
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(msgs, tokenize=False)  # exactly DeepSeek's rendering
    # the labelled tokens, read back, are the two answers each followed by the end-of-sentence token
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["多休息，多喝水。" + tok.eos_token, "必要时服用布洛芬。" + tok.eos_token]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))


def test_fully_truncated_dataset_is_refused(tok, records16):
    with pytest.raises(TrainError, match="empty after tokenization/truncation"):
        encode_records(tok, records16, max_len=12)  # prompts alone are longer than 12 tokens


def test_tokenizer_that_loses_text_is_refused(tok, records16):
    class Lossy:  # a real tokenizer that drops every non-ASCII character (transformers #45488's symptom)
        eos_token = tok.eos_token

        def apply_chat_template(self, *a, **k):
            return tok.apply_chat_template(*a, **k)

        def __call__(self, text, **k):
            kept = "".join(ch if ord(ch) < 128 or ch in "｜▁" else "" for ch in text)
            enc = tok(kept, **k)
            enc["offset_mapping"] = [(0, 0)] * len(enc["input_ids"])
            return enc

    with pytest.raises(TrainError):
        encode_records(Lossy(), records16, max_len=512)


def test_record_without_messages_names_the_line(tok):
    with pytest.raises(DataError, match="line 2: key 'messages'"):
        encode_records(tok, [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                             {"id": "b"}], 64, source="train.jsonl")
