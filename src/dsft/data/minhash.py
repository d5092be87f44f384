"""MinHash + LSH near-duplicate detection for Chinese and English: vectorised shingling, rensa signatures, exact verify."""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_P = np.uint64(0x100000001B3)  # FNV prime: the polynomial base of the rolling n-gram hash
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_WORD = re.compile(r"[^\W_]")
_TABLES: dict[str, Any] = {}


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """Per-BMP-character normalisation: NFKC, lowercase, punctuation/space dropped (built once, ~50 ms)."""
    if not _TABLES:
        out = np.arange(0x10000, dtype=np.uint32)
        keep = np.zeros(0x10000, dtype=bool)
        multi = np.zeros(0x10000, dtype=bool)
        expand: dict[int, str] = {}
        for c in range(0x10000):
            if 0xD800 <= c < 0xE000:
                continue
            ch = chr(c)
            s = ch.lower() if ch.isascii() else unicodedata.normalize("NFKC", ch).lower()
            s = "".join(_WORD.findall(s))
            if len(s) == 1:
                out[c] = ord(s)
                keep[c] = True
            elif len(s) > 1:
                multi[c] = True
                expand[c] = s
        cjk = np.zeros(0x10000, dtype=bool)
        for lo, hi in ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xAC00, 0xD7AF)):
            cjk[lo:hi + 1] = True
        _TABLES.update(out=out, keep=keep, multi=multi, expand=expand, cjk=cjk)
    t = _TABLES
    return t["out"], t["keep"], t["multi"], t["expand"]


def normalize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise many texts at once → (code points uint32, owner doc of each, length per doc).

    Per character: NFKC, lowercase, drop everything that is not a letter or digit (CJK included).
    """
    out, keep, multi, expand = _tables()
    n = len(texts)
    lens0 = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    owner = np.repeat(np.arange(n, dtype=np.int64), lens0)
    bmp = cp < 0x10000
    idx = np.where(bmp, cp, 0)
    k = np.where(bmp, keep[idx], True)
    m = np.where(bmp, multi[idx], False)
    cp = np.where(bmp, out[idx], cp)
    if not bmp.all():  # astral characters: keep letters/digits (CJK extensions), drop emoji and symbols
        astral = np.unique(cp[~bmp])
        bad = [int(c) for c in astral if not _WORD.match(chr(int(c)))]
        if bad:
            k &= ~np.isin(cp, np.asarray(bad, dtype=np.uint32))
    if m.any():  # rare multi-character expansions (ligatures, ㎏, ⑩): insert the extra characters
        pos = np.flatnonzero(m)
        ins_at, ins_cp, ins_owner = [], [], []
        for p in pos.tolist():
            s = expand[int(cp[p])]
            cp[p] = ord(s[0])
            k[p] = True
            for ch in s[1:]:
                ins_at.append(p + 1)
                ins_cp.append(ord(ch))
                ins_owner.append(owner[p])
        cp = np.insert(cp, ins_at, np.asarray(ins_cp, dtype=np.uint32))
        owner = np.insert(owner, ins_at, np.asarray(ins_owner, dtype=np.int64))
        k = np.insert(k, ins_at, True)
    cp, owner = cp[k], owner[k]
    lens = np.bincount(owner, minlength=n).astype(np.int64)
    return cp, owner, lens


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (spreads the polynomial hash over all 64 bits)."""
    h = h ^ (h >> np.uint64(30))
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def _poly(values: np.ndarray) -> np.uint64:
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for v in values.astype(np.uint64).tolist():
            h = h * _P + np.uint64(v)
    return h


def char_shingles(cp: np.ndarray, lens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the character n-grams of each doc (vectorised) → (tokens uint64, count per doc).

    A doc shorter than n (but not empty) gets one token: the hash of its whole text.
    """
    total = int(cp.size)
    counts = np.where(lens >= n, lens - n + 1, np.where(lens > 0, 1, 0)).astype(np.int64)
    if total == 0:
        return np.zeros(0, dtype=np.uint64), counts
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    m = max(total - n + 1, 0)
    if m:
        h = cp[:m].astype(np.uint64)
        with np.errstate(over="ignore"):
            for k in range(1, n):
                h *= _P
                h += cp[k:m + k]
        pos = np.arange(m, dtype=np.int64) - np.repeat(starts, lens)[:m]
        limit = np.repeat(lens - n, lens)[:m]
        valid = pos <= limit
        tok = h[valid]
        owner = np.repeat(np.arange(lens.size), lens)[:m][valid]
    else:
        tok = np.zeros(0, dtype=np.uint64)
        owner = np.zeros(0, dtype=np.int64)
    short = np.flatnonzero((lens > 0) & (lens < n))
    if short.size:
        extra = np.asarray([_poly(cp[starts[d]:starts[d] + lens[d]]) ^ np.uint64(0x5BD1E995) for d in short.tolist()], dtype=np.uint64)
        tok = np.concatenate([tok, extra])
        owner = np.concatenate([owner, short])
        order = np.argsort(owner, kind="stable")
        tok = tok[order]
    with np.errstate(over="ignore"):
        return _mix(tok), counts


def word_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of word n-grams (NFKC, lowercase, split on non-word characters) for space-separated text."""
    from dsft.data.text import normalize_words

    toks, counts = [], []
    for t in texts:
        words = normalize_words(t)
        if not words:
            counts.append(0)
            continue
        wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        if len(words) < n:
            toks.append(np.asarray([_poly(wh)], dtype=np.uint64))
        else:
            m = len(words) - n + 1
            h = wh[:m].copy()
            with np.errstate(over="ignore"):
                for k in range(1, n):
                    h *= _P
                    h += wh[k:m + k]
            toks.append(h)
        counts.append(len(toks[-1]))
    tok = np.concatenate(toks) if toks else np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(tok ^ np.uint64(0x9E3779B97F4A7C15)), np.asarray(counts, dtype=np.int64)


def shingle(texts: list[str], ngram: int = 5, word_ngram: int = 3, cjk_threshold: float = 0.3,
            mode: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many texts: char n-grams for CJK text, word n-grams for space-separated text.

    mode: auto (decided per text by its share of CJK characters), char, word. Returns (tokens, count per text).
    """
    cp, owner, lens = normalize_batch(texts)
    if mode == "char":
        return char_shingles(cp, lens, ngram)
    cjk = _TABLES["cjk"]
    is_cjk = np.where(cp < 0x10000, cjk[np.minimum(cp, 0xFFFF)], True)
    share = np.bincount(owner, weights=is_cjk, minlength=len(texts)) / np.maximum(lens, 1)
    words = np.flatnonzero(share < cjk_threshold) if mode == "auto" else np.arange(len(texts))
    if words.size == 0:
        return char_shingles(cp, lens, ngram)
    chars = np.ones(len(texts), dtype=bool)
    chars[words] = False
    keep = chars[owner]
    c_tok, c_cnt = char_shingles(cp[keep], np.where(chars, lens, 0), ngram)
    w_tok, w_cnt_sub = word_shingles([texts[i] for i in words.tolist()], word_ngram)
    w_cnt = np.zeros(len(texts), dtype=np.int64)
    w_cnt[words] = w_cnt_sub
    counts = np.where(chars, c_cnt, w_cnt)
    tok = np.concatenate([c_tok, w_tok])
    own = np.concatenate([np.repeat(np.arange(len(texts)), np.where(chars, c_cnt, 0)), np.repeat(words, w_cnt_sub)])
    return tok[np.argsort(own, kind="stable")], counts


class ShingleBatch:
    """Picklable batch step: texts → (tokens, count per text); concatenating batches equals one big call."""

    def __init__(self, ngram: int = 5, word_ngram: int = 3, mode: str = "auto"):
        self.ngram, self.word_ngram, self.mode = ngram, word_ngram, mode

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return shingle(texts, self.ngram, self.word_ngram, mode=self.mode)


def concat_shingles(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.25, fn_weight: float = 0.75) -> tuple[int, int]:
    """(bands, rows) with bands·rows = num_perm minimising the weighted false-positive/negative areas of the
    S-curve 1-(1-s^r)^b around the threshold. Recall is weighted up: candidates are verified afterwards."""

    def area(f, a: float, b: float, steps: int = 200) -> float:
        xs = np.linspace(a, b, steps)
        return float(np.trapezoid(f(xs), xs)) if hasattr(np, "trapezoid") else float(np.trapz(f(xs), xs))

    best, best_err = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        for r in ([num_perm // b] if num_perm % b == 0 else []):
            fp = area(lambda s, b=b, r=r: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = area(lambda s, b=b, r=r: (1 - s ** r) ** b, threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


@dataclass
class NearDupResult:
    """What near-dedup found: keep mask over the input, one row per removed doc, and how it got there."""

    keep: np.ndarray
    duplicates: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def _band_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Candidate pairs (i < j, local indices) of rows of sig sharing a band: each bucket → (lowest, other)."""
    n = sig.shape[0]
    pairs = []
    s64 = sig.astype(np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            block = s64[:, b * rows:(b + 1) * rows]
            h = np.full(n, np.uint64(b) + np.uint64(0x243F6A8885A308D3), dtype=np.uint64)
            for c in range(rows):
                h = _mix(h * _P + block[:, c])
            order = np.lexsort((np.arange(n), h))
            hs = h[order]
            same = np.flatnonzero(hs[1:] == hs[:-1]) + 1  # positions whose predecessor has the same hash
            if same.size == 0:
                continue
            # the first element of each run of equal hashes is the lowest index (lexsort breaks ties by index)
            run_start = np.flatnonzero(np.concatenate([[True], hs[1:] != hs[:-1]]))
            head = run_start[np.searchsorted(run_start, same, side="right") - 1]
            pairs.append(np.stack([order[head], order[same]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def _exact_jaccard(tokens: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the shingle sets of each pair."""
    cache: dict[int, np.ndarray] = {}

    def s(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = np.unique(tokens[offsets[i]:offsets[i + 1]])
        return cache[i]

    out = np.empty(len(pairs), dtype=np.float64)
    for k, (a, b) in enumerate(pairs.tolist()):
        sa, sb = s(a), s(b)
        inter = np.intersect1d(sa, sb, assume_unique=True).size
        union = sa.size + sb.size - inter
        out[k] = inter / union if union else 1.0
    return out


def near_dedup(texts: list[str], *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, word_ngram: int = 3,
               bands: int | None = None, rows: int | None = None, verify: str = "exact", seed: int = 1,
               mode: str = "auto", shingles: tuple[np.ndarray, np.ndarray] | None = None) -> NearDupResult:
    """Find near-duplicate clusters among texts; keep the lowest index of each connected component.

    verify: `exact` (Jaccard of the shingle sets ≥ threshold), `minhash` (estimated from signatures), `none`.
    shingles: (tokens, count per text) computed elsewhere (e.g. by an engine, batch by batch) with `shingle`.
    """
    import rensa

    n = len(texts)
    if bands is None or rows is None:
        bands, rows = optimal_bands(threshold, num_perm) if bands is None and rows is None else (
            bands or num_perm // rows, rows or num_perm // bands)
    if bands * rows > num_perm:
        raise ValueError(f"bands×rows = {bands}×{rows} exceeds num_perm {num_perm}")
    tok, counts = shingles if shingles is not None else shingle(texts, ngram, word_ngram, mode=mode)
    docs = np.flatnonzero(counts > 0)  # empty texts never match anything
    keep = np.ones(n, dtype=bool)
    stats: dict[str, Any] = {"bands": bands, "rows": rows, "num_perm": num_perm, "threshold": threshold,
                             "ngram": ngram, "docs": n, "shingles": int(tok.size)}
    if docs.size < 2:
        return NearDupResult(keep, [], {**stats, "candidates": 0, "pairs": 0})
    offsets = np.concatenate([[0], np.cumsum(counts[docs])]).astype(np.uint64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(tok, offsets, num_perm, seed)
    # rensa flags every row that shares a band with another (fast, in Rust); only those need their signature
    lsh = rensa.RMinHashLSH(threshold, num_perm, bands)
    flags = np.asarray(lsh.insert_matrix_and_query_duplicate_flags(matrix), dtype=bool) if rows * bands == num_perm else None
    if flags is None:
        cand_docs = np.arange(docs.size)
        sig = np.asarray(matrix.to_rows(), dtype=np.uint32)
    else:
        cand_docs = np.flatnonzero(flags)
        if cand_docs.size < 2:
            return NearDupResult(keep, [], {**stats, "candidates": int(cand_docs.size), "pairs": 0})
        own = np.repeat(np.arange(docs.size), counts[docs])
        sel = flags[own]
        sub_off = np.concatenate([[0], np.cumsum(counts[docs][cand_docs])]).astype(np.uint64)
        sub = rensa.RMinHash.digest_matrix_from_flat_token_hashes(tok[sel], sub_off, num_perm, seed)
        sig = np.asarray(sub.to_rows(), dtype=np.uint32)
    pairs = _band_pairs(sig, bands, rows)
    stats["candidates"] = int(cand_docs.size)
    stats["candidate_pairs"] = int(len(pairs))
    full_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    gpairs = docs[cand_docs[pairs]] if len(pairs) else np.zeros((0, 2), dtype=np.int64)
    if verify == "exact":
        jac = _exact_jaccard(tok, full_off, gpairs) if len(gpairs) else np.zeros(0)
    elif verify == "minhash":
        jac = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) if len(pairs) else np.zeros(0)
    elif verify == "none":
        jac = np.ones(len(gpairs))
    else:
        raise ValueError(f"verify must be exact, minhash or none, got {verify!r}")
    ok = jac >= threshold if verify != "none" else np.ones(len(gpairs), dtype=bool)
    edges = gpairs[ok]
    stats["pairs"] = int(len(edges))
    # connected components (union-find, root = lowest index)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    involved = sorted({int(x) for x in edges.ravel().tolist()})
    dups = []
    removed = [i for i in involved if find(i) != i]
    if removed:
        roots = np.asarray([find(i) for i in removed], dtype=np.int64)
        rem = np.asarray(removed, dtype=np.int64)
        if verify == "exact":
            jr = _exact_jaccard(tok, full_off, np.stack([roots, rem], axis=1))
        else:
            jr = np.full(len(rem), np.nan)
            pos = {int(d): k for k, d in enumerate(docs[cand_docs].tolist())}
            for k, (a, b) in enumerate(zip(roots.tolist(), rem.tolist(), strict=True)):
                jr[k] = float((sig[pos[a]] == sig[pos[b]]).mean())
        for i, r, j in zip(rem.tolist(), roots.tolist(), jr.tolist(), strict=True):
            keep[i] = False
            dups.append({"index": i, "duplicate_of": r, "jaccard": round(float(j), 4)})
    stats["removed"] = len(dups)
    return NearDupResult(keep, dups, stats)

