"""Template parity on real DeepSeek tokenizers + chat templates: training ids == apply_chat_template ids == the
default engine's prompt == the template vLLM is given == the Ollama Modelfile (rendered by Go's text/template)."""

from __future__ import annotations

import shutil

import pytest

from dsft.doctor.check import doctor
from dsft.model.parity import CONVERSATIONS, TRAIN, check_parity
from dsft.model.tokenizer import load_tokenizer, resolve_tokenizer_path
from dsft.train.encode import IGNORE, Encoded, dataset_fingerprint, encode_messages, encode_rows

HAS_GO = shutil.which("go") is not None
TEMPLATES = [  # (chat template name, tokenizer it ships with)
    ("deepseek-v3", "deepseek-v3"), ("deepseek-v3.1", "deepseek-v3.1"), ("deepseek-v3.1-thinking", "deepseek-v3.1"),
    ("deepseek-r1", "deepseek-r1"), ("r1-distill-qwen", "deepseek-r1-distill-qwen-7b"),
    ("r1-distill-llama", "deepseek-r1-distill-llama-8b"), (None, "embedded"),
    # the plain formats too (their hand-written Modelfile TEMPLATEs used to trim away their own newlines)
    ("deepseek-llm", "deepseek-llm-7b-base"), ("deepseek-coder", "deepseek-coder-7b-base-v1.5"),
]
EOS = "<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("template,tokenizer", TEMPLATES, ids=[t or "embedded" for t, _ in TEMPLATES])
def test_every_path_gives_the_inference_ids(template, tokenizer):
    table = doctor(resolve_tokenizer_path(tokenizer), chat_template=template)
    assert table.ok, table.failure_line()
    assert set(table.paths) == {TRAIN, "serve", "vllm", "modelfile"}
    expected = {"ok"} if HAS_GO else {"ok", "n/a"}
    for c in table.checks:
        assert c.status in (expected if c.path == "modelfile" else {"ok"}), c
    # every conversation kind and every assistant turn of the multi-turn one was checked
    assert {c.conversation for c in table.checks} == set(CONVERSATIONS)
    assert {c.turn for c in table.checks if c.conversation.startswith("multi-turn")} == {1, 2, 3}


@pytest.fixture(scope="module")
def r1q():
    return load_tokenizer("deepseek-r1-distill-qwen-7b", chat_template="r1-distill-qwen")


def _labelled(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_r1_trains_after_the_think_prompt_and_history_drops_think(r1q):
    conv = CONVERSATIONS["multi-turn, history think"]
    rows = encode_rows(r1q, conv, 4096)
    assert len(rows) == 3  # each turn after its own prompt: history turns lost their think block
    ids, labels, _, _ = rows[1]
    text = r1q.decode(ids)
    assert text.startswith(r1q.apply_chat_template(conv[:4], add_generation_prompt=True, tokenize=False))
    assert "先问体温" not in text  # R1's rule: the first turn's <think> content is gone from history
    assert text.endswith("<｜Assistant｜><think>\n高烧，持续三天。\n</think>\n\n请尽快就医。" + EOS)
    assert _labelled(r1q, ids, labels) == "高烧，持续三天。\n</think>\n\n请尽快就医。" + EOS
    # an answer without reasoning gets R1's empty think block after the prompt's <think>\n
    ids, labels, _, _ = rows[2]
    assert _labelled(r1q, ids, labels) == "\n</think>\n\n遵医嘱服用布洛芬。" + EOS


def test_think_in_loss_false_masks_exactly_the_think_block(r1q):
    conv = CONVERSATIONS["thinking"]
    ids, labels, _, _ = encode_messages(r1q, conv, 4096)
    m_ids, m_labels, _, _ = encode_messages(r1q, conv, 4096, think_in_loss=False)
    assert m_ids == ids  # same tokens, only the loss changes
    masked = [i for i, (a, b) in enumerate(zip(labels, m_labels, strict=True)) if a != b]
    assert masked == list(range(masked[0], masked[-1] + 1))  # one contiguous span
    assert r1q.decode([ids[i] for i in masked]) == "发烧三天，需要排除感染。\n</think>"  # '<think>\n' is the prompt's
    assert r1q.convert_ids_to_tokens(ids[masked[-1]]) == "</think>"
    assert _labelled(r1q, m_ids, m_labels) == "\n\n建议去医院查血常规。" + EOS  # the answer is still trained


def test_the_check_catches_a_train_path_that_renders_history_form(r1q):
    """main's encoder before this change tokenized the whole history rendering: R1 prompts lacked '<think>\\n'."""
    def history_form(tok, msgs):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        return ids, ids

    table = check_parity(r1q, {TRAIN: history_form, "reference": check_ids},
                         template="r1-distill-qwen")
    assert not table.ok
    c = table.failures()[0]
    assert c.path == TRAIN and c.conversation == "single-turn"
    assert "<｜Assistant｜><think>\n" in c.expected and "<think>" not in c.got
    assert "token" in table.failure_line() and "\n" not in table.failure_line().replace("\\n", "")


def check_ids(tok, msgs):
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.mark.skipif(not HAS_GO, reason="needs a Go toolchain to render the Modelfile's Go template")
def test_the_check_catches_the_old_modelfile_on_r1(r1q):
    """The Modelfile before this change ended R1 prompts with '<｜Assistant｜>' (no '<think>\\n')."""
    from dsft.model.ollama import ollama_messages, render_go

    old = ('{{- if .System }}{{ .System }}{{ end }}{{- range $i, $_ := .Messages }}'
           '{{- $last := eq (len (slice $.Messages $i)) 1 }}{{- if eq .Role "user" }}<｜User｜>{{ .Content }}'
           '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}{{- if not $last }}<｜end▁of▁sentence｜>{{- end }}'
           '{{- end }}{{- if and $last (ne .Role "assistant") }}<｜Assistant｜>{{- end }}{{- end }}')

    def old_modelfile(tok, msgs):
        text = render_go([(old, ollama_messages(msgs, drop_think=True))])[0]
        return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]

    table = check_parity(r1q, {"modelfile": old_modelfile}, conversations={"single": CONVERSATIONS["single-turn"]})
    assert [c.status for c in table.checks] == ["diff"]
    assert "<｜Assistant｜><think>\n" in table.checks[0].expected and "<think>" not in table.checks[0].got


def test_the_embedded_template_encodes_the_same_ids_as_before():
    """The demo's template path is unchanged: fingerprint computed with main's encoder (9009a56) on these chats."""
    tok = load_tokenizer("embedded")
    exs = [Encoded(*encode_messages(tok, c, 512)[:2]) for c in CONVERSATIONS.values()]
    assert dataset_fingerprint(exs) == "ba539488d12d407b"


def test_modelfile_writes_bos_only_when_the_gguf_does_not_add_it():
    """llama.cpp adds no BOS to the embedded model's GGUF (its tokenizer_config has no add_bos_token=true: checked on
    the GGUF export writes, tokenize(b'hi', add_bos=True) == [89, 90]), so the TEMPLATE must write it."""
    from dsft.export.gguf import modelfile
    from dsft.model.ollama import gguf_adds_bos
    from dsft.model.templates import get_template

    assert gguf_adds_bos(resolve_tokenizer_path("embedded")) is False
    assert gguf_adds_bos(resolve_tokenizer_path("deepseek-r1-distill-qwen-7b")) is True
    tpl = get_template("deepseek-v3")
    assert 'TEMPLATE """<｜begin▁of▁sentence｜>{{ if .System }}' in modelfile("m.gguf", tpl, runtime_adds_bos=False)
    assert 'TEMPLATE """{{ if .System }}' in modelfile("m.gguf", tpl, runtime_adds_bos=True)
