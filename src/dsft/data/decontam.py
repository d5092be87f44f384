"""N-gram decontamination: drop training records that share an n-gram with an eval / benchmark set."""

from __future__ import annotations

import numpy as np

from dsft.data.minhash import shingle


def ngram_set(texts: list[str], n: int) -> np.ndarray:
    """Sorted unique n-gram hashes of texts (char n-grams for CJK, word n-grams for spaced text)."""
    tok, counts = shingle(texts, ngram=n, word_ngram=n)
    # texts shorter than n contribute one whole-text token; keep it: a short eval answer copied verbatim is a leak too
    return np.unique(tok)


class ContaminationCheck:
    """Picklable batch step: texts → (hit count per text) against a fixed eval n-gram set."""

    def __init__(self, eval_hashes: np.ndarray, n: int):
        self.eval_hashes = eval_hashes
        self.n = n

    def __call__(self, texts: list[str]) -> np.ndarray:
        tok, counts = shingle(texts, ngram=self.n, word_ngram=self.n)
        hit = np.isin(tok, self.eval_hashes, assume_unique=False)
        owner = np.repeat(np.arange(len(texts)), counts)
        return np.bincount(owner, weights=hit, minlength=len(texts)).astype(np.int64)
