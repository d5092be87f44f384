"""Text helpers: normalisation for exact dedup and word shingles (NFKC, case, punctuation); clipped values for errors."""

from __future__ import annotations

import re
import unicodedata

# \w keeps letters (CJK included) and digits; everything else (spaces, punctuation, symbols) goes.
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, lowercase, strip whitespace and punctuation: the key exact dedup compares."""
    return _NON_WORD.sub("", unicodedata.normalize("NFKC", text or "").lower())


def normalize_words(text: str) -> list[str]:
    """NFKC + lowercase, split on anything that is not a word character (for space-separated text)."""
    return [w for w in _NON_WORD.split(unicodedata.normalize("NFKC", text or "").lower()) if w]


CLIP = 200


def clip(value: object, limit: int = CLIP) -> str:
    """A value as it may appear in an error line: its text (repr for non-strings), at most `limit` characters."""
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= limit else f"{s[:limit]}… ({len(s):,} characters)"
