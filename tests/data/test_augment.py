"""Augmentation: synonyms with protected terms, jinja2 templates, back-translation through a tiny local model."""

from __future__ import annotations

import random
import shutil
import textwrap

import pytest

from dsft.config import config_from_dict
from dsft.data.augment import (
    augment_records,
    back_translate,
    load_protected,
    load_synonyms,
    load_translator,
    parse_synonyms,
    synonym_replace,
    template_records,
)
from dsft.data.stage import run as prepare
from dsft.errors import ConfigError
from dsft.model.tokenizer import embedded_tokenizer_dir
from dsft.run import RunDir, read_jsonl

TEXT = "平时注意饮食清淡，建议服用阿司匹林100mg，及时到医院检查。"


def rec(i: int, q: str = "头痛怎么办？", ctx: str = "平时注意休息，建议多喝水。", label: str = "神经科") -> dict:
    return {"id": f"t:{i}", "messages": [{"role": "user", "content": f"{q}\n{ctx}"}, {"role": "assistant", "content": "多休息。"}],
            "fields": {"question": q, "context": ctx, "answer": "多休息。"}, "label": label, "domain": label,
            "source": {"file": "t", "line": i}, "provenance": "original"}


def test_synonyms_protect_terms_and_numbers():
    table = load_synonyms(None)
    prot = load_protected(["阿司匹林", "清淡"], None)
    outs = {synonym_replace(TEXT, random.Random(s), table, prot, 1.0)[0] for s in range(20)}
    assert len(outs) > 3  # real variety
    for o in outs:
        assert "阿司匹林100mg" in o and "清淡" in o and "医院" in o and o != TEXT
    assert synonym_replace(TEXT, random.Random(3), table, prot, 0.5) == synonym_replace(TEXT, random.Random(3), table, prot, 0.5)
    en, n = synonym_replace("I suggest you avoid alcohol.", random.Random(0), table, prot, 1.0)
    assert n == 2 and "alcohol" in en and "suggest" not in en


def test_shipped_medical_terms_are_protected_even_when_a_list_has_them():
    table = parse_synonyms("感冒 伤风\n建议 推荐\nALT 谷丙\n")
    prot = load_protected([], None)
    assert {"感冒", "阿司匹林", "二甲双胍", "糖尿病"} <= prot
    out, n = synonym_replace("感冒了，建议查ALT。", random.Random(0), table, prot, 1.0)
    assert out == "感冒了，推荐查ALT。" and n == 1


def test_cilin_format_is_accepted():
    t = parse_synonyms("Aa01A01= 人 士 人物\nAa01A02# 相关 无关\nAa01A03@ 单独\n头痛 头疼")
    assert t["士"] == ["人", "士", "人物"] and "相关" not in t and t["头疼"] == ["头痛", "头疼"]


def test_templates_and_errors():
    out = template_records([rec(1)], ["【{{ domain }}】{{ question }}", "{{ question }}（补充：{{ context }}）"])
    assert [r["messages"][0]["content"] for r in out] == ["【神经科】头痛怎么办？", "头痛怎么办？（补充：平时注意休息，建议多喝水。）"]
    assert all(r["provenance"] == "augmented:template" and r["augmented_from"] == "t:1" for r in out)
    with pytest.raises(ConfigError, match=r"templates\[0\].*undefined"):
        template_records([rec(1)], ["{{ nope }}"])


@pytest.fixture(scope="module")
def tiny_translator(tmp_path_factory):
    """A real (tiny, random-init) causal LM with the embedded DeepSeek tokenizer, saved as a local folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("translator")
    for f in embedded_tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_back_translation_with_a_local_model(tiny_translator):
    tr = load_translator(str(tiny_translator))
    tr.max_new_tokens = 12
    recs = [rec(1), rec(2, q="胃痛怎么办？")]
    out1 = back_translate(recs, tr)
    out2 = back_translate(recs, tr)
    assert out1 and [r["messages"] for r in out1] == [r["messages"] for r in out2]  # greedy: deterministic
    for r in out1:
        assert r["provenance"] == "augmented:back_translation" and r["messages"][-1] == recs[0]["messages"][-1]
        assert r["messages"][0]["content"] and r["messages"][0]["content"] != recs[0]["messages"][0]["content"]


def test_pluggable_translator(tmp_path, monkeypatch):
    (tmp_path / "mytr.py").write_text(textwrap.dedent('''
        class Rev:
            def translate(self, texts, src, tgt):
                return [t[::-1] + ("!" if tgt == "zh" else "") for t in texts]
        def make():
            return Rev()
    '''), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    tr = load_translator("mytr:make")
    (out,) = back_translate([rec(1)], tr)
    assert out["messages"][0]["content"] == "头痛怎么办？\n平时注意休息，建议多喝水。!"
    with pytest.raises(ConfigError, match="cannot import"):
        load_translator("nosuchmodule:make")


def test_augment_records_ratio_and_provenance():
    from dsft.config import DataConfig

    train = [rec(i) for i in range(40)]
    acfg = DataConfig(augment={"methods": ["synonym", "template"], "ratio": 0.5, "templates": ["{{ question }}？"]}).augment
    new, info = augment_records(train, acfg, seed=1)
    assert info["made"]["template"] == 20 and 0 < info["made"]["synonym"] <= 20
    assert new == augment_records(train, acfg, seed=1)[0]
    assert {r["provenance"] for r in new} == {"augmented:synonym", "augmented:template"}


def test_prepare_keeps_augmentation_out_of_test_and_eval(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "data": {
        "eval_size": 0.05, "augment": {"methods": ["synonym", "template"], "ratio": 0.2,
                                       "templates": ["请问{{ domain }}医生：{{ question }}"],
                                       "protected_terms": ["糖尿病", "高血压"]}}})
    m = prepare(cfg, RunDir(cfg.run_dir))
    d = RunDir(cfg.run_dir).root / "data"
    train = read_jsonl(d / "train.jsonl")
    aug = [r for r in train if r["provenance"].startswith("augmented:")]
    assert len(aug) > 200
    for name in ("test.jsonl", "eval.jsonl"):
        assert all(r["provenance"] == "original" for r in read_jsonl(d / name))
    held_out = {r["id"] for r in read_jsonl(d / "test.jsonl") + read_jsonl(d / "eval.jsonl")}
    assert not {r["augmented_from"] for r in aug} & held_out
    c = m["counts"]
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    # augmented records also get the derived label task (a reworded question is a new classification example)
    assert c["train"] == sum(r["provenance"] != "derived:label_task" for r in train) == c["derived"]
