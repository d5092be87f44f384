"""Quality filters for SFT pairs (length, ratio, repetition, special characters, completeness, refusals) and PII."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from dsft.data.text import clip
from dsft.errors import ConfigError

PII_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")),
    # 18-digit resident ID: region, birth date 18xx/19xx/20xx, sequence, checksum digit or X
    ("ID", re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])")),
    # mainland mobile (+86 optional, separators allowed) and landline with area code
    ("PHONE", re.compile(r"(?<![\d+])(?:\+?86[\s\-]?)?1[3-9]\d(?:[\s\-]?\d{4}){2}(?!\d)")),
    ("PHONE", re.compile(r"(?<!\d)0\d{2,3}-\d{7,8}(?!\d)")),
]
ANY_PII = re.compile("|".join(f"(?:{p.pattern})" for _, p in PII_PATTERNS))
REFUSAL_PATTERNS = [
    r"作为一?个?(?:AI|ai|人工智能)(?:语言模型|助手|模型)?",
    r"我(?:只)?是一?个(?:AI|ai|人工智能)(?:语言模型|助手|模型)",
    r"(?:很)?抱歉[，,]?\s*我(?:无法|不能)(?:回答|提供|帮助|协助)",
    r"\bAs an AI(?: language model| assistant)?\b",
    r"\bI'?m sorry,? but I (?:can(?:no|')t|am unable to)\b",
    r"\bI (?:cannot|can't) (?:help|assist|provide) (?:you )?with\b",
]
TERMINAL = set("。？！.?!…」』”\"'’)）】》>~～")
COMMON_PUNCT = set("，。？！、；：“”‘’（）《》【】—…·,.?!;:'\"()[]-–/%+=<>#&*@~～\n\t ")


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace e-mail addresses, Chinese ID numbers and phone numbers by [EMAIL] / [ID] / [PHONE]."""
    found: Counter[str] = Counter()
    for kind, pat in PII_PATTERNS:
        text, n = pat.subn(f"[{kind}]", text)
        if n:
            found[kind] += n
    return text, found


def char_repetition_ratio(text: str, n: int = 10) -> float:
    """Share of character n-gram occurrences that belong to an n-gram seen more than once."""
    s = "".join(text.split())
    if len(s) < n + 1:
        return 0.0
    grams = [s[i:i + n] for i in range(len(s) - n + 1)]
    if len(set(grams)) == len(grams):  # the common case: nothing repeats
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


# letters/digits/underscore, whitespace and common punctuation are never special: strip them in C first
_PLAIN = re.compile(r"[\w\s" + re.escape("".join(sorted(COMMON_PUNCT))) + r"]+")


def special_char_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits, whitespace nor common (CJK or ASCII) punctuation."""
    if not text:
        return 0.0
    bad = 0
    for c in _PLAIN.sub("", text):
        if c.isalnum() or c in COMMON_PUNCT or c.isspace():
            continue
        if unicodedata.category(c).startswith("P"):
            continue
        bad += 1
    return bad / len(text)


class QualityFilter:
    """Applies the `data.quality` checks to canonical records; picklable (plain data only)."""

    def __init__(self, q: dict[str, Any]):
        self.q = q
        for p in q.get("extra_patterns") or []:
            try:
                re.compile(p)
            except re.error as err:
                raise ConfigError(f"data.quality.extra_patterns: {p!r} is not a valid regular expression ({err})") from err
        # one alternation per kind: a single search per answer instead of one per pattern
        self.refusal = [(kind, re.compile("|".join(f"(?:{p})" for p in pats), re.IGNORECASE))
                        for kind, pats in (("refusal", REFUSAL_PATTERNS if q.get("drop_refusals") else []),
                                           ("boilerplate", list(q.get("extra_patterns") or []))) if pats]

    def __call__(self, batch: list[dict]) -> list[tuple[dict | None, str | None, str | None, dict]]:
        return [self.check(r) for r in batch]

    def check(self, rec: dict) -> tuple[dict | None, str | None, str | None, dict]:
        """(record or None, drop reason, detail, pii counts). PII masking returns a new record."""
        q = self.q
        pii: Counter[str] = Counter()
        if q.get("pii", "off") != "off":
            texts = {m["content"] for m in rec["messages"]} | {v for v in (rec.get("fields") or {}).values() if isinstance(v, str)}
            hits: Counter[str] = Counter()
            for t in texts:
                if ANY_PII.search(t):  # one combined search first: most texts hold no PII at all
                    hits.update(mask_pii(t)[1])
            if hits:
                if q["pii"] == "drop":
                    return None, "pii", ", ".join(f"{k}×{v}" for k, v in sorted(hits.items())), dict(hits)
                msgs = []
                for m in rec["messages"]:
                    c, h = mask_pii(m["content"])
                    pii.update(h)
                    msgs.append({**m, "content": c})
                fields = {k: (mask_pii(v)[0] if isinstance(v, str) else v) for k, v in (rec.get("fields") or {}).items()}
                rec = {**rec, "messages": msgs, "fields": fields}
        f = rec.get("fields") or {}
        answer = next((m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant"), "")
        values = {"question": f.get("question", ""), "context": f.get("context", ""), "answer": f.get("answer", answer),
                  "conversation": "".join(m["content"] for m in rec["messages"])}
        for field, lo in (q.get("min_chars") or {}).items():
            if field in values and len(values[field].strip()) < lo and (field in f or field == "conversation" or field == "answer"):
                return None, f"too_short:{field}", f"{len(values[field].strip())} < {lo} characters", dict(pii)
        for field, hi in (q.get("max_chars") or {}).items():
            if field in values and len(values[field]) > hi:
                return None, f"too_long:{field}", f"{len(values[field])} > {hi} characters", dict(pii)
        qlen = len(values["question"]) + len(values["context"])
        ratio = len(values["answer"]) / max(qlen, 1)
        if q.get("min_answer_question_ratio") is not None and ratio < q["min_answer_question_ratio"]:
            return None, "answer_question_ratio", f"{ratio:.2f} < {q['min_answer_question_ratio']}", dict(pii)
        if q.get("max_answer_question_ratio") is not None and ratio > q["max_answer_question_ratio"]:
            return None, "answer_question_ratio", f"{ratio:.2f} > {q['max_answer_question_ratio']}", dict(pii)
        if q.get("max_char_repetition") is not None:
            r = char_repetition_ratio(answer)
            if r > q["max_char_repetition"]:
                return None, "char_repetition", f"{r:.2f} of the answer's 10-grams repeat (> {q['max_char_repetition']})", dict(pii)
        if q.get("max_special_char_ratio") is not None:
            r = special_char_ratio(answer)
            if r > q["max_special_char_ratio"]:
                return None, "special_chars", f"{r:.2f} of the answer is special characters (> {q['max_special_char_ratio']})", dict(pii)
        if q.get("require_terminal_punctuation") and answer.rstrip()[-1:] not in TERMINAL:
            return None, "incomplete_answer", f"ends with {answer.rstrip()[-1:]!r}, not terminal punctuation", dict(pii)
        for kind, pat in self.refusal:
            mt = pat.search(answer)
            if mt:
                return None, kind, f"matches {clip(repr(mt.group(0)))}", dict(pii)
        return rec, None, None, dict(pii)


def token_filter(records: list[dict], q: dict[str, Any], tokenizer_name: str) -> list[tuple[str, str] | None]:
    """Token-length checks (min_tokens / max_tokens per field) with a real tokenizer, batched. None = keep."""
    from dsft.data.tokens import count_tokens

    out: list[tuple[str, str] | None] = [None] * len(records)
    limits = {**{k: (v, None) for k, v in (q.get("min_tokens") or {}).items()}}
    for k, v in (q.get("max_tokens") or {}).items():
        limits[k] = (limits.get(k, (None, None))[0], v)
    for field, (lo, hi) in sorted(limits.items()):
        texts = []
        for r in records:
            f = r.get("fields") or {}
            if field == "conversation":
                texts.append("\n".join(m["content"] for m in r["messages"]))
            else:
                texts.append(f.get(field, "") or "")
        lens = count_tokens(tokenizer_name, texts)
        for i, n in enumerate(lens):
            if out[i] is not None:
                continue
            if lo is not None and n < lo:
                out[i] = (f"too_few_tokens:{field}", f"{n} < {lo} tokens")
            elif hi is not None and n > hi:
                out[i] = (f"too_many_tokens:{field}", f"{n} > {hi} tokens")
    return out
