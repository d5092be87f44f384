"""Text normalisation shared by dedup, filters and stats (NFKC, case, whitespace and punctuation)."""

from __future__ import annotations

import re
import unicodedata

# \w keeps letters (CJK included) and digits; everything else (spaces, punctuation, symbols) goes.
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def normalize(text: str) -> str:
    """NFKC, lowercase, strip whitespace and punctuation: the key exact dedup compares."""
    return _NON_WORD.sub("", unicodedata.normalize("NFKC", text or "").lower())


def normalize_words(text: str) -> list[str]:
    """NFKC + lowercase, split on anything that is not a word character (for space-separated text)."""
    return [w for w in _NON_WORD.split(unicodedata.normalize("NFKC", text or "").lower()) if w]


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among the non-space characters of text."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return len(_CJK.findall(text)) / len(chars)


def is_cjk(text: str, threshold: float = 0.3) -> bool:
    """True when text is mostly unspaced CJK (then n-grams are over characters, not words)."""
    return cjk_ratio(text[:2000]) >= threshold
