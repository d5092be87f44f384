"""Metrics as pure functions (BLEU, ROUGE, SQuAD F1/EM, accuracy, Macro-F1, AUC, perplexity), Chinese-aware.

Conventions (also in docs/eval.md):
- Every score is in [0, 1]; BLEU is sacrebleu's corpus score / 100 (tokenizer `zh` for Chinese, `13a` otherwise).
- ROUGE-1/2/L are rouge-score's F-measures averaged over pairs. English uses rouge-score's own tokenizer;
  Chinese is **character-level**: every CJK character is one token, every run of ASCII letters/digits is one
  lower-cased token, punctuation and spaces are dropped (rouge-score's default tokenizer would delete all
  Chinese text and score 0 — the LLaMA-Factory #6267 symptom).
- SQuAD F1/EM: English as the official SQuAD v1.1 script (normalised bag-of-words F1); Chinese as the
  CMRC 2018 script, mirrored exactly (its punctuation list, removed before segmentation; each Chinese character
  a token, other runs through NLTK's word tokenizer; F1 from the longest common *substring*; EM after its
  remove_punctuation). CMRC's list omits ASCII , . ? ! ( ) — they stay tokens there, and so here.
- Accuracy / Macro-F1 from scikit-learn; AUC is one-vs-rest, macro-averaged over the classes present in the
  references, from per-label scores (equals sklearn's `roc_auc_score(multi_class="ovr")` when every class
  occurs); perplexity = exp(token-weighted mean negative log-likelihood).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff\u3040-\u30ff\uac00-\ud7af]")
_ASCII_RUN = re.compile(r"[A-Za-z0-9]+")


def is_cjk(ch: str) -> bool:
    return bool(_CJK.match(ch))


def detect_lang(texts: Sequence[str], threshold: float = 0.2) -> str:
    """'zh' when at least `threshold` of the non-space characters are CJK, else 'en'."""
    chars = [c for t in texts for c in (t or "") if not c.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(is_cjk(c) for c in chars) / len(chars) >= threshold else "en"


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def mixed_segmentation(text: str, *, remove_punct: bool = True) -> list[str]:
    """CJK characters one by one, ASCII letter/digit runs as one lower-cased token; punctuation dropped."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.append("".join(run).lower())
            run.clear()

    for ch in text or "":
        if ch.isascii() and ch.isalnum():
            run.append(ch)
            continue
        flush()
        if ch.isspace():
            continue
        if _is_punct(ch):
            if not remove_punct:
                out.append(ch)
            continue
        out.append(ch)  # CJK and any other non-ASCII character
    flush()
    return out


class _CharTokenizer:
    """rouge-score tokenizer object for Chinese: character-level (see module docstring)."""

    def tokenize(self, text: str) -> list[str]:
        return mixed_segmentation(text)


def _resolve_lang(lang: str, texts: Sequence[str]) -> str:
    if lang == "auto":
        return detect_lang(texts)
    if lang not in ("zh", "en"):
        raise ValueError(f"lang must be 'zh', 'en' or 'auto', got {lang!r}")
    return lang


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def bleu(predictions: Sequence[str], references: Sequence[str], lang: str = "auto") -> float:
    """Corpus BLEU in [0, 1] (sacrebleu score / 100); tokenizer `zh` for Chinese, `13a` otherwise."""
    import sacrebleu

    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    lang = _resolve_lang(lang, references)
    res = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh" if lang == "zh" else "13a")
    return res.score / 100.0


def rouge(predictions: Sequence[str], references: Sequence[str], lang: str = "auto",
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measures {rouge1, rouge2, rougeL}; character-level for Chinese (see module docstring)."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    if not predictions:
        return {t: 0.0 for t in types}
    lang = _resolve_lang(lang, references)
    scorer = rouge_scorer.RougeScorer(list(types), tokenizer=_CharTokenizer() if lang == "zh" else None)
    sums = dict.fromkeys(types, 0.0)
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)  # rouge-score's order: (target, prediction)
        for t in types:
            sums[t] += s[t].fmeasure
    return {t: v / len(predictions) for t, v in sums.items()}


def rouge_l(predictions: Sequence[str], references: Sequence[str], lang: str = "auto") -> float:
    """Mean ROUGE-L F-measure (character-level for Chinese)."""
    return rouge(predictions, references, lang, types=("rougeL",))["rougeL"]


# --- SQuAD-style F1 / EM -------------------------------------------------------------------------------

def _squad_normalize_en(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _lcs_substring_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common contiguous run of tokens (CMRC 2018's `find_lcs`)."""
    best = 0
    prev = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = [0] * (len(b) + 1)
        ai = a[i - 1]
        for j in range(1, len(b) + 1):
            if ai == b[j - 1]:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best:
                    best = cur[j]
        prev = cur
    return best


# CMRC 2018's evaluation script (cmrc2018_evaluate.py), mirrored: its punctuation list (kept verbatim, including
# the two-character '……' that can never match one character), punctuation dropped *before* segmentation, each
# Chinese character [\u4e00-\u9fa5] a token, other runs tokenized like nltk.word_tokenize.
CMRC_PUNCT = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；", "’",
              "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"]
_word_tokenize = None


def _nltk_word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize when its punkt data is installed, else NLTK's Treebank word tokenizer (no sentence split)."""
    global _word_tokenize
    if _word_tokenize is None:
        import nltk

        try:
            nltk.word_tokenize("a b.")
            _word_tokenize = nltk.word_tokenize
        except LookupError:
            from nltk.tokenize import NLTKWordTokenizer

            _word_tokenize = NLTKWordTokenizer().tokenize
    return _word_tokenize(text)


def cmrc_segmentation(text: str) -> list[str]:
    """CMRC 2018's mixed_segmentation(text, rm_punc=True)."""
    out: list[str] = []
    run = ""
    for ch in str(text or "").lower().strip():
        if ch in CMRC_PUNCT:
            continue
        if "\u4e00" <= ch <= "\u9fa5":
            if run:
                out.extend(_nltk_word_tokenize(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(_nltk_word_tokenize(run))
    return out


def cmrc_remove_punctuation(text: str) -> str:
    """CMRC 2018's remove_punctuation: lower-case, strip, drop the listed punctuation (inner spaces kept)."""
    return "".join(ch for ch in str(text or "").lower().strip() if ch not in CMRC_PUNCT)


def _f1_one(prediction: str, reference: str, lang: str) -> float:
    if lang == "zh":
        p, r = cmrc_segmentation(prediction), cmrc_segmentation(reference)
        common = _lcs_substring_len(r, p)
    else:
        p, r = _squad_normalize_en(prediction).split(), _squad_normalize_en(reference).split()
        common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _em_one(prediction: str, reference: str, lang: str) -> float:
    if lang == "zh":
        return float(cmrc_remove_punctuation(prediction) == cmrc_remove_punctuation(reference))
    return float(_squad_normalize_en(prediction) == _squad_normalize_en(reference))


def _as_ref_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _best_over_references(one, predictions, references, lang: str) -> float:
    """Mean over items of the best score against any of the item's references (SQuAD / CMRC 2018 convention)."""
    _check_pairs(predictions, references)
    refs = _as_ref_lists(references)
    if not predictions:
        return 0.0
    lang = _resolve_lang(lang, [x for r in refs for x in r])
    return sum(max(one(p, r, lang) for r in rs) for p, rs in zip(predictions, refs, strict=True)) / len(predictions)


def squad_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]], lang: str = "auto") -> float:
    """Mean SQuAD F1 (max over each item's references); CMRC 2018 style (character-level) for Chinese."""
    return _best_over_references(_f1_one, predictions, references, lang)


def squad_em(predictions: Sequence[str], references: Sequence[str | Sequence[str]], lang: str = "auto") -> float:
    """Mean exact match after SQuAD (English) / CMRC 2018 (Chinese) normalisation."""
    return _best_over_references(_em_one, predictions, references, lang)


# --- classification ------------------------------------------------------------------------------------

def accuracy(labels: Sequence[str], predictions: Sequence[str]) -> float:
    """Fraction of exact label matches (sklearn accuracy_score)."""
    from sklearn.metrics import accuracy_score

    if not labels:
        return 0.0
    return float(accuracy_score(list(labels), list(predictions)))


def macro_f1(labels: Sequence[str], predictions: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions (sklearn, zero_division=0)."""
    from sklearn.metrics import f1_score

    if not labels:
        return 0.0
    return float(f1_score(list(labels), list(predictions), average="macro", zero_division=0))


def auc_ovr(labels: Sequence[str], scores: Sequence[Mapping[str, float]]) -> float | None:
    """One-vs-rest ROC AUC from per-label scores, macro-averaged over classes present in labels.

    A class contributes when it occurs in `labels` and does not cover every item (else AUC is undefined).
    None when no class qualifies (e.g. a single class).
    """
    from sklearn.metrics import roc_auc_score

    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} score rows")
    classes = sorted(set(labels))
    aucs = []
    for c in classes:
        y = [int(lab == c) for lab in labels]
        if 0 < sum(y) < len(y):
            aucs.append(float(roc_auc_score(y, [float(s.get(c, 0.0)) for s in scores])))
    return sum(aucs) / len(aucs) if aucs else None


def confusion(labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str] | None = None) -> tuple[list[str], list[list[int]]]:
    """(classes, matrix) with matrix[i][j] = count of true classes[i] predicted as classes[j]."""
    classes = list(classes) if classes is not None else sorted(set(labels) | set(predictions))
    idx = {c: i for i, c in enumerate(classes)}
    m = [[0] * len(classes) for _ in classes]
    for t, p in zip(labels, predictions, strict=True):
        if t in idx and p in idx:
            m[idx[t]][idx[p]] += 1
    return classes, m


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of scored tokens)."""
    if n_tokens <= 0:
        return float("nan")
    return math.exp(nll_sum / n_tokens)


def softmax(values: Mapping[str, float]) -> dict[str, float]:
    """Normalise log-scores {label: logp} into probabilities."""
    m = max(values.values())
    ex = {k: math.exp(v - m) for k, v in values.items()}
    z = sum(ex.values())
    return {k: v / z for k, v in ex.items()}


TEXT_METRICS = ("bleu", "rouge_1", "rouge_2", "rouge_l", "f1", "em")
CLASS_METRICS = ("accuracy", "macro_f1", "auc")


def text_metrics(predictions: Sequence[str], references: Sequence[str], lang: str = "auto",
                 metrics: Sequence[str] = ("bleu", "rouge_l")) -> dict[str, float]:
    """The named text metrics of (predictions, references) as {name: value}."""
    out: dict[str, float] = {}
    want = set(metrics)
    if want & {"rouge_1", "rouge_2", "rouge_l"}:
        r = rouge(predictions, references, lang)
        for name, key in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
            if name in want:
                out[name] = r[key]
    if "bleu" in want:
        out["bleu"] = bleu(predictions, references, lang)
    if "f1" in want:
        out["f1"] = squad_f1(predictions, references, lang)
    if "em" in want:
        out["em"] = squad_em(predictions, references, lang)
    return out


def class_metrics(labels: Sequence[str], predictions: Sequence[str], scores: Sequence[Mapping[str, float]] | None = None,
                  metrics: Sequence[str] = ("accuracy", "macro_f1", "auc")) -> dict[str, float | None]:
    """The named classification metrics as {name: value}; auc needs scores (None otherwise)."""
    out: dict[str, float | None] = {}
    if "accuracy" in metrics:
        out["accuracy"] = accuracy(labels, predictions)
    if "macro_f1" in metrics:
        out["macro_f1"] = macro_f1(labels, predictions)
    if "auc" in metrics:
        out["auc"] = auc_ovr(labels, scores) if scores is not None and all(s for s in scores) else None
    return out
