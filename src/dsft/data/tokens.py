"""Fast token counting for filters and reports: the `tokenizers` library directly (no transformers import)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dsft.errors import ModelError

PROBE = "头痛怎么办? Headache after 3 days, 体温38.5℃。"


def tokenizer_for(cfg) -> str | None:
    """Which tokenizer the data stage counts with: data.quality.tokenizer, model.tokenizer, or the model's own."""
    return cfg.data.quality.tokenizer or cfg.model.tokenizer or cfg.model.name_or_path


@lru_cache(maxsize=4)
def load_fast(name_or_path: str):
    """A `tokenizers.Tokenizer` for a tokenizer reference (embedded, real DeepSeek name, folder); probed."""
    from tokenizers import Tokenizer

    from dsft.model.tokenizer import resolve_tokenizer_path

    ref = "embedded:tiny-deepseek-v3" if name_or_path.startswith("embedded:") else name_or_path
    path = Path(resolve_tokenizer_path(ref)) / "tokenizer.json"
    if not path.exists():
        raise ModelError(f"{path.parent}: no tokenizer.json (the data stage counts tokens with a fast tokenizer)")
    tok = Tokenizer.from_file(str(path))
    ids = tok.encode(PROBE, add_special_tokens=False).ids
    if len(ids) < 4 or tok.decode(ids).strip() != PROBE:
        raise ModelError(f"{path}: tokenizer does not round-trip the probe {PROBE!r}")
    return tok


def count_tokens(name_or_path: str, texts: list[str]) -> list[int]:
    tok = load_fast(name_or_path)
    enc = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [len(e.ids) for e in enc(texts, add_special_tokens=False)]


def record_token_lengths(cfg, records: list[dict]) -> dict[str, list[int]]:
    """Token lengths per field (question, answer, the whole conversation) with the model's fast tokenizer
    (raises when there is none)."""
    name = tokenizer_for(cfg)
    tokens: dict[str, list[int]] = {}
    for k in ("question", "answer"):
        texts = [t for t in ((r.get("fields") or {}).get(k) for r in records) if t]
        if texts:
            tokens[k] = count_tokens(name, texts)
    tokens["conversation"] = count_tokens(name, ["\n".join(m["content"] for m in r["messages"]) for r in records])
    return tokens
