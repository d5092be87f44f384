"""Predictors vs one-at-a-time computations on a real tiny DeepSeek-V3 (padding must not change results)."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import real_records
from transformers import AutoModelForCausalLM

from dsft.eval import predict as P
from dsft.model.tokenizer import load_tokenizer
from dsft.records import label_prompt_messages, prompt_and_reference


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(str(tiny_model_dir))


def _manual_logprob(model, ids: list[int], n_prompt: int) -> float:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))


def test_continuation_is_the_templated_assistant_turn(model_tok):
    _, tok = model_tok
    prompt, cont = P.continuation_text(tok, [{"role": "user", "content": "头痛怎么办？"}], "多喝水。")
    assert prompt.endswith("<｜Assistant｜>") and prompt.startswith(tok.bos_token)
    assert cont == "多喝水。" + tok.eos_token


def test_batched_logprobs_equal_unbatched(model_tok):
    model, tok = model_tok
    recs = real_records(5)
    pairs = []
    for r in recs:
        msgs, ans = prompt_and_reference(r)
        p, c = P.continuation_text(tok, msgs, ans)
        pairs.append((tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]))
    batched = P.continuation_logprobs(model, tok, pairs, batch_size=4)
    for (p, c), (s, n) in zip(pairs, batched, strict=True):
        assert n == len(c)
        assert s == pytest.approx(_manual_logprob(model, p + c, len(p)), abs=2e-3)


def test_answer_loss_is_token_weighted(model_tok):
    model, tok = model_tok
    items = [prompt_and_reference(r) for r in real_records(4)]
    res = P.answer_loss(model, tok, items, batch_size=3)
    per = P.continuation_logprobs(model, tok, [
        (tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
        for p, c in (P.continuation_text(tok, m, a) for m, a in items)], batch_size=1)
    nll, n = -sum(s for s, _ in per), sum(k for _, k in per)
    assert res["tokens"] == n and res["loss"] == pytest.approx(nll / n, abs=1e-4)
    assert res["perplexity"] == pytest.approx(torch.exp(torch.tensor(nll / n)).item(), rel=1e-4)


def test_left_padded_generation_equals_one_at_a_time(model_tok):
    model, tok = model_tok
    prompts = [prompt_and_reference(r)[0] for r in real_records(4)]
    assert len({len(P.prompt_text(tok, m)) for m in prompts}) > 1  # prompts of different lengths → padding happens
    s = P.GenerationSettings(max_new_tokens=10, batch_size=4)
    batched = P.generate(model, tok, prompts, s)
    single = [P.generate(model, tok, [m], P.GenerationSettings(max_new_tokens=10, batch_size=1))["texts"][0] for m in prompts]
    assert batched["texts"] == single
    assert batched["settings"]["max_new_tokens"] == 10 and batched["settings"]["do_sample"] is False
    assert any(batched["texts"])


def test_label_scores_match_manual_and_classify_is_argmax(model_tok):
    model, tok = model_tok
    recs = real_records(3)
    labels = ["消化科", "神经科", "内分泌科"]
    prompts = [label_prompt_messages(r, "{question}\n请问这个问题应该挂哪个科室？") for r in recs]
    scores = P.label_scores(model, tok, prompts, labels, batch_size=4)
    for msgs, sc in zip(prompts, scores, strict=True):
        p, _ = P.continuation_text(tok, msgs, labels[0])
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        for lab in labels:
            c_ids = tok(P.continuation_text(tok, msgs, lab)[1], add_special_tokens=False)["input_ids"]
            assert sc[lab] == pytest.approx(_manual_logprob(model, p_ids + c_ids, len(p_ids)), abs=2e-3)
    preds, probs = P.classify(model, tok, prompts, labels)
    for sc, pr, pd in zip(scores, probs, preds, strict=True):
        assert pd == max(sc, key=sc.get) and sum(pr.values()) == pytest.approx(1.0)


def test_multiple_choice_picks_highest_likelihood(model_tok):
    model, tok = model_tok
    msgs = [{"role": "user", "content": "下列哪个是消化科的疾病？"}]
    choices = ["胃炎", "偏头痛", "糖尿病", "哮喘"]
    got = P.multiple_choice(model, tok, [msgs, msgs], [choices, list(reversed(choices))])
    sc = P.label_scores(model, tok, [msgs], choices)[0]
    best = max(sc, key=sc.get)
    assert choices[got[0]] == best and list(reversed(choices))[got[1]] == best


@pytest.mark.parametrize("name,template,cont", [
    ("deepseek-v3", None, "多喝水。<｜end▁of▁sentence｜>"),
    ("deepseek-v2", None, " 多喝水。<｜end▁of▁sentence｜>"),
    ("deepseek-llm-7b-base", "deepseek-llm", " 多喝水。<｜end▁of▁sentence｜>"),
    ("deepseek-coder-7b-base-v1.5", "deepseek-coder", "多喝水。\n<|EOT|>\n"),
    # R1's generation prompt opens a <think> block the rendered conversation lacks → answer + EOS after it
    ("deepseek-r1-distill-qwen-7b", None, "多喝水。<｜end▁of▁sentence｜>"),
])
def test_continuation_with_real_deepseek_templates(name, template, cont):
    tok = load_tokenizer(name, chat_template=template)
    msgs = [{"role": "user", "content": "头痛怎么办？"}]
    prompt, got = P.continuation_text(tok, msgs, "多喝水。")
    assert got == cont
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
