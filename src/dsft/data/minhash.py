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
        width = keep.astype(np.uint8)  # characters each input character becomes: 0 dropped, 1, or an expansion's length
        for c, e in expand.items():
            width[c] = len(e)
        _TABLES.update(out=out, keep=keep, multi=multi, expand=expand, cjk=cjk, width=width)
    t = _TABLES
    return t["out"], t["keep"], t["multi"], t["expand"]


def normalize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise many texts at once → (code points uint32, owner doc of each, length per doc).

    Per character: NFKC, lowercase, drop everything that is not a letter or digit (CJK included).
    """
    cp, lens = normalize_codepoints(texts)
    return cp, np.repeat(np.arange(len(texts), dtype=np.int64), lens), lens


def normalize_codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(normalised code points of all texts back to back, length per text) — vectorised, no per-text Python."""
    out, keep, multi, expand = _tables()
    n = len(texts)
    lens0 = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    raw = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    if not raw.size or int(raw.max()) < 0x10000:  # the common case: one table lookup per character
        width = _TABLES["width"][raw]
        mapped = out[raw]
    else:  # astral characters: keep letters/digits (CJK extensions), drop emoji and symbols
        bmp = raw < 0x10000
        idx = np.where(bmp, raw, 0)
        astral = sorted_unique(raw[~bmp])
        good = np.asarray([int(c) for c in astral if _WORD.match(chr(int(c)))], dtype=np.uint32)
        width = np.where(bmp, _TABLES["width"][idx], np.isin(raw, good).astype(np.uint8))
        mapped = np.where(bmp, out[idx], raw)
    ends0 = np.cumsum(lens0)
    cs = np.concatenate([[0], np.cumsum(width, dtype=np.int64)])
    lens = cs[ends0] - cs[ends0 - lens0]
    multi_pos = np.flatnonzero(width > 1)
    if multi_pos.size == 0:
        return mapped[width.astype(bool)], lens
    # rare multi-character expansions (℃ → °c, ㎏ → kg, ⑩ → 10): repeat, then write the expansion in place
    cp = np.repeat(mapped, width)
    at = cs[multi_pos]
    for p, a in zip(multi_pos.tolist(), at.tolist(), strict=True):
        e = expand[int(raw[p])]
        cp[a:a + len(e)] = [ord(ch) for ch in e]
    return cp, lens


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
    ends = np.cumsum(lens)
    starts = ends - lens
    m = max(total - n + 1, 0)
    if m:
        h = cp[:m].astype(np.uint64)
        with np.errstate(over="ignore"):
            for k in range(1, n):
                h *= _P
                h += cp[k:m + k]
        # an n-gram starting in the last n-1 characters of a doc crosses into the next one: mask those starts
        valid = np.ones(m, dtype=bool)
        bad = (ends[:, None] - np.arange(1, n)[None, :]).ravel()
        bad = bad[(bad >= np.repeat(starts, n - 1)) & (bad < m)]
        valid[bad] = False
        tok = h[valid]
    else:
        tok = np.zeros(0, dtype=np.uint64)
    short = np.flatnonzero((lens > 0) & (lens < n))
    if short.size:
        extra = np.asarray([_poly(cp[starts[d]:starts[d] + lens[d]]) ^ np.uint64(0x5BD1E995) for d in short.tolist()], dtype=np.uint64)
        long_counts = np.where(lens >= n, lens - n + 1, 0)
        owner = np.concatenate([np.repeat(np.arange(lens.size), long_counts), short])
        tok = np.concatenate([tok, extra])[np.argsort(owner, kind="stable")]
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
    cp, lens = normalize_codepoints(texts)
    if mode == "char":
        return char_shingles(cp, lens, ngram)
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), lens)
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


def resolve_bands(threshold: float, num_perm: int, bands: int | None, rows: int | None) -> tuple[int, int]:
    """(bands, rows): derived from the threshold when neither is given, else completed from num_perm (ValueError
    when bands × rows exceeds num_perm)."""
    if bands is None and rows is None:
        return optimal_bands(threshold, num_perm)
    bands, rows = bands or num_perm // rows, rows or num_perm // bands
    if bands * rows > num_perm:
        raise ValueError(f"bands×rows = {bands}×{rows} exceeds num_perm {num_perm}")
    return bands, rows


@dataclass
class NearDupResult:
    """What near-dedup found: keep mask over the input, one row per removed doc, and how it got there."""

    keep: np.ndarray
    duplicates: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n × bands) uint64: one hash per LSH band of each signature row."""
    n = sig.shape[0]
    s64 = sig.astype(np.uint64)
    out = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(n, np.uint64(b) + np.uint64(0x243F6A8885A308D3), dtype=np.uint64)
            for c in range(b * rows, (b + 1) * rows):
                h = h * _P + s64[:, c]
            out[:, b] = _mix(h)
    return out


def pairs_from_band_hashes(bh: np.ndarray) -> np.ndarray:
    """Candidate pairs (i < j) of rows sharing a band hash: each bucket → (lowest index, each other member)."""
    n = bh.shape[0]
    pairs = []
    for b in range(bh.shape[1]):
        h = bh[:, b]
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
    allp = np.concatenate(pairs).astype(np.int64)
    key = sorted_unique(allp[:, 0] * np.int64(n) + allp[:, 1])
    return np.stack([key // n, key % n], axis=1)


def _band_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Candidate pairs (i < j, local indices) of rows of sig sharing a band."""
    return pairs_from_band_hashes(band_hashes(sig, bands, rows))


def signatures(tok: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int):
    """rensa MinHash signatures of many docs at once from one flat buffer of shingle hashes.

    rensa's Rayon pool starts with one thread unless RAYON_NUM_THREADS says otherwise: on a busy 2-core machine its
    fork-join waits for a preempted worker (measured: 3× slower wall-clock); dsft's engines parallelise instead.
    The variable is set only around the call, so other Rust libraries (tokenizers) keep their own default."""
    import os

    import rensa

    unset = "RAYON_NUM_THREADS" not in os.environ
    if unset:
        os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        return rensa.RMinHash.digest_matrix_from_flat_token_hashes(tok, offsets, num_perm, seed)
    finally:
        if unset:
            os.environ.pop("RAYON_NUM_THREADS", None)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is far slower on large uint64 arrays)."""
    s = np.sort(a)
    if s.size == 0:
        return s
    return s[np.concatenate([[True], s[1:] != s[:-1]])]


def unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, index of each element of a in them), sort-based."""
    order = np.argsort(a)
    s = a[order]
    flag = np.concatenate([[True], s[1:] != s[:-1]]) if s.size else np.zeros(0, dtype=bool)
    inv = np.empty(a.size, dtype=np.int64)
    inv[order] = np.cumsum(flag) - 1
    return s[flag], inv


def exact_jaccard(tokens: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Jaccard of the shingle sets of each pair, vectorised with single-key int64 sorts.

    Shingles are compared by the top 32 bits of their 64-bit hash (a collision inside one pair's ~300 shingles has
    probability ~1e-5, far below any threshold step)."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    docs, inv = unique_inverse(pairs.ravel())
    lens = offsets[docs + 1] - offsets[docs]
    idx = np.repeat(offsets[docs] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
    t32 = (tokens[idx] >> np.uint64(32)).astype(np.int64)
    # distinct shingles per involved doc: sort (doc << 32 | shingle), drop repeats
    key = sorted_unique((np.repeat(np.arange(docs.size, dtype=np.int64), lens) << 32) | t32)
    own, tid = key >> 32, key & 0xFFFFFFFF
    size = np.bincount(own, minlength=docs.size)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    a, b = inv.reshape(-1, 2)[:, 0], inv.reshape(-1, 2)[:, 1]
    la, lb = size[a], size[b]
    # the two sets of each pair side by side, tagged with the pair id: a (pair, shingle) seen twice is shared
    seg = np.stack([la, lb], axis=1).ravel()
    seg_start = np.stack([start[a], start[b]], axis=1).ravel()
    pos = np.repeat(seg_start - np.concatenate([[0], np.cumsum(seg)[:-1]]), seg) + np.arange(int(seg.sum()))
    pid = np.repeat(np.arange(len(pairs), dtype=np.int64), la + lb)
    pk = np.sort((pid << 32) | tid[pos])
    dup = pk[1:] == pk[:-1]
    inter = np.bincount(pk[1:][dup] >> 32, minlength=len(pairs))
    union = la + lb - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def near_dedup(texts: list[str], *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, word_ngram: int = 3,
               bands: int | None = None, rows: int | None = None, verify: str = "exact", seed: int = 1,
               mode: str = "auto", shingles: tuple[np.ndarray, np.ndarray] | None = None) -> NearDupResult:
    """Find near-duplicate clusters among texts; keep the lowest index of each connected component.

    verify: `exact` (Jaccard of the shingle sets ≥ threshold), `minhash` (estimated from signatures), `none`.
    shingles: (tokens, count per text) computed elsewhere (e.g. by an engine, batch by batch) with `shingle`.
    """
    import rensa

    n = len(texts)
    bands, rows = resolve_bands(threshold, num_perm, bands, rows)
    tok, counts = shingles if shingles is not None else shingle(texts, ngram, word_ngram, mode=mode)
    docs = np.flatnonzero(counts > 0)  # empty texts never match anything
    keep = np.ones(n, dtype=bool)
    stats: dict[str, Any] = {"bands": bands, "rows": rows, "num_perm": num_perm, "threshold": threshold,
                             "ngram": ngram, "docs": n, "shingles": int(tok.size)}
    if docs.size < 2:
        return NearDupResult(keep, [], {**stats, "candidates": 0, "pairs": 0})
    offsets = np.concatenate([[0], np.cumsum(counts[docs])]).astype(np.uint64)
    matrix = signatures(tok, offsets, num_perm, seed)
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
        sub_counts = counts[docs][cand_docs]
        sub_start = offsets[:-1].astype(np.int64)[cand_docs]
        gather = np.repeat(sub_start - np.concatenate([[0], np.cumsum(sub_counts)[:-1]]), sub_counts) + np.arange(int(sub_counts.sum()))
        sub_off = np.concatenate([[0], np.cumsum(sub_counts)]).astype(np.uint64)
        sub = signatures(tok[gather], sub_off, num_perm, seed)
        sig = np.asarray(sub.to_rows(), dtype=np.uint32)
    pairs = _band_pairs(sig, bands, rows)
    stats["candidates"] = int(cand_docs.size)
    stats["candidate_pairs"] = int(len(pairs))
    full_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    gpairs = docs[cand_docs[pairs]] if len(pairs) else np.zeros((0, 2), dtype=np.int64)
    if verify == "exact":
        jac = exact_jaccard(tok, full_off, gpairs) if len(gpairs) else np.zeros(0)
    elif verify == "minhash":
        jac = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) if len(pairs) else np.zeros(0)
    elif verify == "none":
        jac = np.ones(len(gpairs))
    else:
        raise ValueError(f"verify must be exact, minhash or none, got {verify!r}")
    ok = jac >= threshold if verify != "none" else np.ones(len(gpairs), dtype=bool)
    edges = gpairs[ok]
    stats["pairs"] = int(len(edges))

    def jaccard_of(pairs_: np.ndarray) -> list[float]:
        if verify == "exact":
            return exact_jaccard(tok, full_off, pairs_).tolist()
        pos = {int(d): k for k, d in enumerate(docs[cand_docs].tolist())}
        return [float((sig[pos[a]] == sig[pos[b]]).mean()) for a, b in pairs_.tolist()]

    dups = cluster(edges, jac[ok], jaccard_of)
    for x in dups:
        keep[x["index"]] = False
    stats["removed"] = len(dups)
    return NearDupResult(keep, dups, stats)


def cluster(edges: np.ndarray, edge_jac: np.ndarray, jaccard_of) -> list[dict[str, Any]]:
    """Connected components of the confirmed pairs; every member but the lowest index is a duplicate of it.

    Each row: {index, duplicate_of (the kept record), jaccard (to it)} plus {matched, matched_jaccard} when the
    record joined through a chain (its confirmed partner is itself a duplicate). jaccard_of(pairs) computes the
    Jaccard of (kept, removed) pairs that were not confirmed directly."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    involved = sorted({int(x) for x in edges.ravel().tolist()})
    removed = [i for i in involved if find(i) != i]
    if not removed:
        return []
    # the confirmed pair that put each record in its cluster (its most similar partner)
    best: dict[int, tuple[float, int]] = {}
    for (a, b), j in zip(edges.tolist(), edge_jac.tolist(), strict=True):
        for x, y in ((a, b), (b, a)):
            if x not in best or (j, -y) > (best[x][0], -best[x][1]):
                best[x] = (j, y)
    roots = [find(i) for i in removed]
    # Jaccard to the kept record: the confirmed pair's when that is the partner, else computed (chains)
    chained = [k for k, (i, r) in enumerate(zip(removed, roots, strict=True)) if best[i][1] != r]
    jr = [best[i][0] for i in removed]
    if chained:
        cj = jaccard_of(np.asarray([[roots[k], removed[k]] for k in chained], dtype=np.int64))
        for k, j in zip(chained, cj, strict=True):
            jr[k] = j
    dups = []
    for i, r, j in zip(removed, roots, jr, strict=True):
        row = {"index": i, "duplicate_of": r, "jaccard": round(float(j), 4)}
        bj, bp = best[i]
        if bp != r:  # chained: similar to a record that is itself a duplicate of the kept one
            row.update(matched=bp, matched_jaccard=round(float(bj), 4))
        dups.append(row)
    return dups


class BandHashBatch:
    """Picklable batch step: texts → (LSH band hashes, n × bands uint64; shingle count per text). The rows of texts
    without shingles are 0: the caller gives them unique values (an empty text is never a candidate)."""

    def __init__(self, ngram: int, word_ngram: int, num_perm: int, seed: int, bands: int, rows: int):
        self.ngram, self.word_ngram, self.num_perm, self.seed = ngram, word_ngram, num_perm, seed
        self.bands, self.rows = bands, rows

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tok, counts = shingle(texts, self.ngram, self.word_ngram)
        bh = np.zeros((len(texts), self.bands), dtype=np.uint64)
        nz = np.flatnonzero(counts > 0)
        if nz.size:
            off = np.concatenate([[0], np.cumsum(counts[nz])]).astype(np.uint64)
            sig = np.asarray(signatures(tok, off, self.num_perm, self.seed).to_rows(), dtype=np.uint32)
            bh[nz] = band_hashes(sig, self.bands, self.rows)
        return bh, counts


def cluster_candidates(pairs: np.ndarray, texts_of, *, threshold: float, verify: str, ngram: int, word_ngram: int,
                       num_perm: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Verify LSH candidate pairs (global indices, i < j) and cluster the confirmed ones (see `cluster`).

    texts_of(indices) returns the texts of the candidate records only, so the caller never holds every text.
    Returns (duplicate rows in global indices, {candidates, candidate_pairs, pairs})."""
    stats = {"candidates": 0, "candidate_pairs": int(len(pairs)), "pairs": 0}
    if not len(pairs):
        return [], stats
    cand = sorted_unique(pairs.ravel())
    tok, counts = shingle(texts_of(cand.tolist()), ngram, word_ngram)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    lp = np.searchsorted(cand, pairs)
    if verify == "exact":
        jac = exact_jaccard(tok, off, lp)

        def jaccard_of(p: np.ndarray) -> list[float]:
            return exact_jaccard(tok, off, p).tolist()
    elif verify in ("minhash", "none"):
        sig = np.asarray(signatures(tok, off.astype(np.uint64), num_perm, seed).to_rows(), dtype=np.uint32)
        jac = (sig[lp[:, 0]] == sig[lp[:, 1]]).mean(axis=1) if verify == "minhash" else np.ones(len(lp))

        def jaccard_of(p: np.ndarray) -> list[float]:
            return [float((sig[a] == sig[b]).mean()) for a, b in p.tolist()]
    else:
        raise ValueError(f"verify must be exact, minhash or none, got {verify!r}")
    ok = jac >= threshold if verify != "none" else np.ones(len(lp), dtype=bool)
    stats.update(candidates=int(cand.size), pairs=int(ok.sum()))
    rows = []
    for x in cluster(lp[ok], jac[ok], jaccard_of):
        row = {**x, "index": int(cand[x["index"]]), "duplicate_of": int(cand[x["duplicate_of"]])}
        if "matched" in x:
            row["matched"] = int(cand[x["matched"]])
        rows.append(row)
    return rows, stats
