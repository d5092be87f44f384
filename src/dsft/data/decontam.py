"""N-gram decontamination: drop training records that share an n-gram with an eval / benchmark set."""

from __future__ import annotations

import numpy as np

from dsft.data.minhash import shingle, sorted_unique


def ngram_set(texts: list[str], n: int) -> np.ndarray:
    """Sorted unique n-gram hashes of texts (char n-grams for CJK, word n-grams for spaced text)."""
    tok, counts = shingle(texts, ngram=n, word_ngram=n)
    # texts shorter than n contribute one whole-text token; keep it: a short eval answer copied verbatim is a leak too
    return sorted_unique(tok)


class ContaminationCheck:
    """Picklable batch step: texts → (hit count per text) against a fixed eval n-gram set."""

    def __init__(self, eval_hashes: np.ndarray, n: int):
        self.eval_hashes = eval_hashes
        self.n = n

    def __call__(self, texts: list[str]) -> np.ndarray:
        tok, counts = shingle(texts, ngram=self.n, word_ngram=self.n)
        pos = np.searchsorted(self.eval_hashes, tok)
        hit = self.eval_hashes[np.minimum(pos, max(self.eval_hashes.size - 1, 0))] == tok if self.eval_hashes.size else np.zeros(tok.size, bool)
        owner = np.repeat(np.arange(len(texts)), counts)
        return np.bincount(owner, weights=hit, minlength=len(texts)).astype(np.int64)
