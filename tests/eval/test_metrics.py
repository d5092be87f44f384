"""Every metric against its reference implementation (sacrebleu, rouge-score, sklearn, SQuAD v1.1, CMRC 2018)."""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter

import numpy as np
import pytest
import sacrebleu
from eval_helpers import real_records
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from dsft.eval import metrics as M

ZH_CHARS = "头痛发烧咳嗽胃炎肝病糖尿病高血压心脏医生建议检查治疗注意休息多喝水药物饮食"
EN_WORDS = "the a an patient doctor fever headache take rest drink water hospital check test blood sugar".split()
CMRC_PUNCT = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；",
              "’", "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"]  # cmrc2018_evaluate.py


def rand_zh(rng: random.Random, n: int) -> str:
    pieces = [rng.choice(ZH_CHARS) for _ in range(n)]
    for _ in range(rng.randint(0, 3)):
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice(["，", "。", "？", " ", "3", "mg", "CT"]))
    return "".join(pieces)


def rand_en(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(EN_WORDS) for _ in range(n)) + rng.choice(["", ".", "!", " ,"])


def pairs(kind: str, seed: int, k: int = 25):
    rng = random.Random(seed)
    f = rand_zh if kind == "zh" else rand_en
    return [f(rng, rng.randint(1, 30)) for _ in range(k)], [f(rng, rng.randint(1, 30)) for _ in range(k)]


def real_pairs():
    recs = real_records(30)
    return [r["fields"]["question"] for r in recs], [r["fields"]["answer"] for r in recs]


# --- BLEU ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["zh", "en"])
def test_bleu_equals_sacrebleu(kind, seed):
    preds, refs = pairs(kind, seed)
    ref = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh" if kind == "zh" else "13a").score / 100
    assert M.bleu(preds, refs, lang=kind) == pytest.approx(ref, abs=1e-6)
    assert M.bleu(preds, refs) == pytest.approx(ref, abs=1e-6)  # language detected


def test_bleu_real_chinese_uses_zh_tokenizer():
    preds, refs = real_pairs()
    preds = [p + r[:20] for p, r in zip(preds, refs, strict=True)]
    zh = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score / 100
    assert M.bleu(preds, refs) == pytest.approx(zh, abs=1e-6)
    # 13a sees each unspaced Chinese clause as one "word" (the near-zero symptom of LLaMA-Factory #6267)
    assert sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score < zh * 100 / 2
    assert M.bleu(refs, refs) == pytest.approx(1.0) and M.bleu(["完全不同"], ["毫无关系的句子"]) == 0.0


# --- ROUGE -----------------------------------------------------------------------------------------------

def lcs_len(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def char_tokens(s: str) -> list[str]:
    """Independent re-statement of the documented Chinese tokenization: CJK chars, ASCII word runs, no punctuation."""
    return re.findall(r"[A-Za-z0-9]+|[\u4e00-\u9fff]", s.lower())


@pytest.mark.parametrize("seed", range(4))
def test_rouge_english_equals_rouge_score(seed):
    preds, refs = pairs("en", seed)
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    want = {t: np.mean([sc.score(r, p)[t].fmeasure for p, r in zip(preds, refs, strict=True)]) for t in ("rouge1", "rouge2", "rougeL")}
    got = M.rouge(preds, refs, lang="en")
    for t in want:
        assert got[t] == pytest.approx(want[t], abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_rouge_chinese_is_char_level(seed):
    preds, refs = pairs("zh", seed)
    preds, refs = preds + real_pairs()[0], refs + real_pairs()[1]
    # reference 1: rouge-score on text pre-split into space-separated characters (the usual Chinese recipe)
    sc = rouge_scorer.RougeScorer(["rougeL", "rouge1"], tokenizer=type("T", (), {"tokenize": staticmethod(str.split)})())
    spaced = lambda s: " ".join(char_tokens(s))  # noqa: E731
    want_l = np.mean([sc.score(spaced(r), spaced(p))["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)])
    want_1 = np.mean([sc.score(spaced(r), spaced(p))["rouge1"].fmeasure for p, r in zip(preds, refs, strict=True)])
    assert M.rouge_l(preds, refs, lang="zh") == pytest.approx(want_l, abs=1e-6)
    assert M.rouge(preds, refs, lang="zh")["rouge1"] == pytest.approx(want_1, abs=1e-6)
    # reference 2: a plain LCS F-measure
    f = []
    for p, r in zip(preds, refs, strict=True):
        a, b = char_tokens(r), char_tokens(p)
        lcs = lcs_len(a, b)
        f.append(0.0 if lcs == 0 else 2 * (lcs / len(b)) * (lcs / len(a)) / ((lcs / len(b)) + (lcs / len(a))))
    assert M.rouge_l(preds, refs) == pytest.approx(float(np.mean(f)), abs=1e-6)


def test_rouge_default_tokenizer_would_zero_chinese():
    preds, refs = real_pairs()
    sc = rouge_scorer.RougeScorer(["rougeL"])
    assert sc.score("多喝水注意休息", "多喝水注意休息")["rougeL"].fmeasure == 0.0  # rouge-score alone deletes CJK
    assert M.rouge_l(refs, refs) == pytest.approx(1.0)
    assert 0 < M.rouge_l(preds, refs) < 1


# --- SQuAD F1 / EM ---------------------------------------------------------------------------------------

def squad_normalize(s):  # the official SQuAD v1.1 evaluation script's normalize_answer
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1_ref(pred, gt):
    p, g = squad_normalize(pred).split(), squad_normalize(gt).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def cmrc_segment(s):  # cmrc2018_evaluate.py mixed_segmentation(rm_punc=True), transcribed
    from nltk.tokenize import NLTKWordTokenizer  # nltk.word_tokenize without punkt's sentence split

    word_tokenize = NLTKWordTokenizer().tokenize
    s = str(s).lower().strip()
    segs, tmp = [], ""
    for ch in s:
        if ch in CMRC_PUNCT:
            continue
        if re.search(r"[\u4e00-\u9fa5]", ch) or ch in CMRC_PUNCT:
            if tmp != "":
                segs.extend(word_tokenize(tmp))
                tmp = ""
            segs.append(ch)
        else:
            tmp += ch
    if tmp != "":
        segs.extend(word_tokenize(tmp))
    return segs


def cmrc_lcs(a, b):  # CMRC 2018 find_lcs: longest common substring
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            if a[i] == b[j]:
                m[i + 1][j + 1] = m[i][j] + 1
                best = max(best, m[i + 1][j + 1])
    return best


def cmrc_f1_ref(pred, answers):
    out = []
    for ans in answers:
        a, p = cmrc_segment(ans), cmrc_segment(pred)
        lcs = cmrc_lcs(a, p)
        out.append(0 if lcs == 0 else 2 * (lcs / len(p)) * (lcs / len(a)) / ((lcs / len(p)) + (lcs / len(a))))
    return max(out)


def cmrc_em_ref(pred, answers):
    rm = lambda s: "".join(c for c in str(s).lower().strip() if c not in CMRC_PUNCT)  # noqa: E731
    return float(any(rm(a) == rm(pred) for a in answers))


@pytest.mark.parametrize("seed", range(4))
def test_squad_f1_em_english(seed):
    preds, refs = pairs("en", seed)
    preds[0] = refs[0].upper() + "!"  # an exact match after normalisation
    want_f1 = np.mean([squad_f1_ref(p, r) for p, r in zip(preds, refs, strict=True)])
    want_em = np.mean([squad_normalize(p) == squad_normalize(r) for p, r in zip(preds, refs, strict=True)])
    assert M.squad_f1(preds, refs, "en") == pytest.approx(want_f1, abs=1e-6)
    assert M.squad_em(preds, refs, "en") == pytest.approx(want_em, abs=1e-6) and want_em > 0


def noisy_zh(rng: random.Random, n: int) -> str:
    """Chinese with the cases CMRC's script treats specially: ASCII words/punctuation, listed punctuation inside runs."""
    pieces = [rng.choice(ZH_CHARS) for _ in range(n)]
    for _ in range(rng.randint(0, 4)):
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice(["，", "。", "？", "-", " ", "3.5mg", "CT?", "B-超", "(", "don't", "…", "……"]))
    return "".join(pieces)


@pytest.mark.parametrize("seed", range(4))
def test_squad_f1_em_chinese_is_cmrc2018(seed):
    rng = random.Random(seed)
    refs = [[noisy_zh(rng, rng.randint(2, 12)) for _ in range(rng.randint(1, 3))] for _ in range(25)]
    preds = [rng.choice(r)[: rng.randint(1, 14)] + rng.choice(["", "。", "的", "-mg", "?"]) for r in refs]
    preds[0] = refs[0][0] + "！"
    want_f1 = np.mean([cmrc_f1_ref(p, r) for p, r in zip(preds, refs, strict=True)])
    want_em = np.mean([cmrc_em_ref(p, r) for p, r in zip(preds, refs, strict=True)])
    assert M.squad_f1(preds, refs, "zh") == pytest.approx(want_f1, abs=1e-6)
    assert M.squad_em(preds, refs, "zh") == pytest.approx(want_em, abs=1e-6) and want_em > 0


def test_squad_hand_computed():
    # "建议多喝水" vs "多喝水休息": longest common substring 多喝水 = 3 chars; P = 3/5, R = 3/5
    assert M.squad_f1(["建议多喝水"], ["多喝水休息"], "zh") == pytest.approx(0.6)
    assert M.squad_em(["多喝水。"], ["多喝水"], "zh") == 1.0
    assert M.squad_f1(["the cat sat"], ["a cat sat down"], "en") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


# --- classification --------------------------------------------------------------------------------------

LABELS = sorted(["消化科", "神经科", "心血管科", "内分泌科"])  # sklearn wants ordered labels


def rand_cls(seed, n=60, k=4, all_present=True):
    rng = np.random.default_rng(seed)
    y = [LABELS[i] for i in rng.integers(0, k, n)]
    if all_present:
        y[:k] = LABELS[:k]
    logits = rng.normal(size=(n, k)) + np.array([[2.0 * (LABELS[j] == y[i]) for j in range(k)] for i in range(n)])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = [LABELS[j] for j in probs.argmax(1)]
    return y, pred, probs


@pytest.mark.parametrize("seed", range(4))
def test_accuracy_macro_f1_equal_sklearn(seed):
    y, pred, _ = rand_cls(seed)
    assert M.accuracy(y, pred) == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    assert M.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-9)


def test_macro_f1_hand_computed():
    # class a: P=1/2 R=1/1 → 2/3 ; class b: P=1/1 R=1/2 → 2/3 ; macro = 2/3
    assert M.macro_f1(["a", "b", "b"], ["a", "a", "b"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_auc_ovr_equals_sklearn(seed):
    y, _, probs = rand_cls(seed)
    rows = [dict(zip(LABELS, map(float, p), strict=True)) for p in probs]
    want = roc_auc_score(y, probs, multi_class="ovr", labels=LABELS, average="macro")
    assert M.auc_ovr(y, rows) == pytest.approx(want, abs=1e-6)


def test_auc_binary_and_absent_class():
    y, _, probs = rand_cls(7, k=2)
    rows = [dict(zip(LABELS[:2], map(float, p), strict=True)) for p in probs]
    assert M.auc_ovr(y, rows) == pytest.approx(roc_auc_score([int(v == LABELS[1]) for v in y], probs[:, 1]), abs=1e-6)
    # a class that never occurs in the references is skipped (its AUC is undefined)
    rows3 = [{**r, "血液科": 0.0} for r in rows]
    assert M.auc_ovr(y, rows3) == pytest.approx(M.auc_ovr(y, rows), abs=1e-12)
    assert M.auc_ovr(["a", "a"], [{"a": 0.9}, {"a": 0.8}]) is None


def test_confusion_matrix():
    classes, m = M.confusion(["a", "b", "b"], ["a", "a", "b"], ["a", "b", "c"])
    assert classes == ["a", "b", "c"] and m == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_perplexity_equals_torch_cross_entropy():
    import torch

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 100, generator=g), torch.randint(0, 100, (50,), generator=g)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
    want = math.exp(torch.nn.functional.cross_entropy(logits, target).item())
    assert M.perplexity(nll, 50) == pytest.approx(want, rel=1e-6)
    assert math.isnan(M.perplexity(0.0, 0))


def test_detect_lang():
    assert M.detect_lang(["头痛怎么办？"]) == "zh" and M.detect_lang(["headache, what to do?"]) == "en"
    assert M.mixed_segmentation("头痛3天, CT正常！") == ["头", "痛", "3", "天", "ct", "正", "常"]


def test_squad_chinese_real_answers_cmrc2018():
    _, answers = real_pairs()
    rng = random.Random(5)
    preds = []
    for a in answers:
        i = rng.randrange(len(a))
        preds.append(a[i: i + rng.randint(5, 60)])
    preds[1] = answers[1]
    want_f1 = np.mean([cmrc_f1_ref(p, [r]) for p, r in zip(preds, answers, strict=True)])
    want_em = np.mean([cmrc_em_ref(p, [r]) for p, r in zip(preds, answers, strict=True)])
    assert M.squad_f1(preds, answers) == pytest.approx(want_f1, abs=1e-6) and 0 < want_f1 < 1
    assert M.squad_em(preds, answers) == pytest.approx(want_em, abs=1e-6) and want_em > 0


def test_cmrc_quirks_are_kept():
    # punctuation is removed before segmentation, so ASCII runs joined by '-' merge (as in the official script)
    assert M.cmrc_segmentation("B-超检查") == ["b", "超", "检", "查"]
    assert M.cmrc_segmentation("ab-cd，好") == ["abcd", "好"]
    assert M.cmrc_segmentation("CT? 正常") == ["ct", "?", "正", "常"]
    assert M.cmrc_remove_punctuation(" 多喝 水。") == "多喝 水"
