"""Training-set augmentation: offline synonym replacement (zh/en, protected terms), back-translation through a
pluggable local-model translator, and jinja2 template filling. New records carry `provenance: augmented:<method>`."""

from __future__ import annotations

import importlib
import logging
import random
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from dsft.errors import ConfigError, DataError
from dsft.records import user_turn

log = logging.getLogger("dsft.data")
_NUM = re.compile(r"\d")
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9\-]+$")  # HBV, ALT, HBV-DNA: protected like numbers
_EN_WORD = re.compile(r"[A-Za-z]+|[^A-Za-z]+")
# always protected: what an edit must never change in a medical answer or question
DEFAULT_PROTECTED = ("医生", "医院", "患者", "病人")


def parse_synonyms(text: str) -> dict[str, list[str]]:
    """word → its group (including itself); accepts plain groups and HIT Cilin lines (`Aa01A01= a b c`)."""
    table: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line.split()[0] or "#" in line.split()[0] or "@" in line.split()[0]:
            if line.split()[0][-1:] != "=":  # Cilin '#' (related) and '@' (single) lines are not synonyms
                continue
            line = line.split(None, 1)[1] if len(line.split()) > 1 else ""
        words = [w for w in line.split() if w]
        if len(words) < 2:
            continue
        for w in words:
            table[w] = list(dict.fromkeys(table.get(w, []) + words))
    return table


@lru_cache(maxsize=8)
def load_synonyms(extra_file: str | None = None) -> dict[str, list[str]]:
    text = (resources.files("dsft") / "assets" / "data" / "synonyms.txt").read_text(encoding="utf-8")
    if extra_file:
        p = Path(extra_file)
        if not p.exists():
            raise DataError(f"{p}: synonyms file not found (data.augment.synonyms_file)")
        text += "\n" + p.read_text(encoding="utf-8")
    return parse_synonyms(text)


def load_protected(terms: list[str], file: str | None) -> frozenset[str]:
    """Never-replaced terms: dsft's medical list + DEFAULT_PROTECTED + the config's terms and file."""
    shipped = (resources.files("dsft") / "assets" / "data" / "protected_medical_zh.txt").read_text(encoding="utf-8")
    out = set(DEFAULT_PROTECTED) | {x.strip() for x in shipped.splitlines() if x.strip() and not x.startswith("#")}
    out |= {t.strip() for t in terms if t.strip()}
    if file:
        p = Path(file)
        if not p.exists():
            raise DataError(f"{p}: protected-terms file not found (data.augment.protected_terms_file)")
        out |= {x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip() and not x.startswith("#")}
    return frozenset(out)


@lru_cache(maxsize=1)
def _jieba():
    """A private jieba tokenizer: the global one may carry words other code added (segmentation must not depend on
    what ran before in this process — the Ray workers start fresh)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tk = jieba.Tokenizer()
    tk.initialize()
    return tk


def tokenize(text: str, protected: frozenset[str]) -> list[str]:
    """jieba for Chinese (protected terms kept whole), word/non-word runs for English."""
    if not re.search(r"[\u4e00-\u9fff]", text):
        return _EN_WORD.findall(text)
    jb = _jieba()
    # protected terms are split out first (never given to jieba), so they stay whole whatever jieba's dictionary says
    if protected:
        pat = re.compile("(" + "|".join(re.escape(t) for t in sorted(protected, key=len, reverse=True)) + ")")
        out: list[str] = []
        for part in pat.split(text):
            if part in protected:
                out.append(part)
            elif part:
                out.extend(jb.lcut(part, HMM=False))
        return out
    return jb.lcut(text, HMM=False)


def synonym_replace(text: str, rng: random.Random, table: dict[str, list[str]], protected: frozenset[str],
                    prob: float) -> tuple[str, int]:
    """Replace each replaceable word with probability prob (at least one when any is replaceable)."""
    toks = tokenize(text, protected)
    cand = [i for i, w in enumerate(toks)
            if w in table and w not in protected and not _NUM.search(w) and not _ACRONYM.match(w) and len(table[w]) > 1]
    if not cand:
        return text, 0
    chosen = [i for i in cand if rng.random() < prob] or [rng.choice(cand)]
    for i in chosen:
        w = toks[i]
        options = [x for x in table[w] if x != w]
        new = rng.choice(options)
        if w.istitle():
            new = new.title()
        toks[i] = new
    return "".join(toks), len(chosen)


class Translator(Protocol):
    """What back-translation needs: translate a batch of texts from one language to another."""

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]: ...


LANG = {"zh": "Chinese", "en": "English", "ja": "Japanese", "fr": "French", "de": "German"}


class HFTranslator:
    """A local Hugging Face model as translator: seq2seq (Marian/T5/NLLB style) or a causal LM (DeepSeek, Qwen …)
    prompted with "Translate the following text from X to Y". Greedy decoding: deterministic."""

    def __init__(self, path: str, max_new_tokens: int = 128, trust_remote_code: bool = False):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").exists():
            raise DataError(f"{p}: not a local model folder (no config.json) for data.augment.translator; dsft never downloads")
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
        self.seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left" if not self.seq2seq else "right"
        self.model = cls.from_pretrained(p, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens
        self.torch = torch

    def _prompt(self, text: str, src: str, tgt: str) -> str:
        if self.seq2seq:
            return text
        instr = f"Translate the following text from {LANG.get(src, src)} to {LANG.get(tgt, tgt)}.\n\n{text}"
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": instr}], tokenize=False, add_generation_prompt=True)
        return instr + "\n\nTranslation:"

    def translate(self, texts: list[str], src: str, tgt: str) -> list[str]:
        prompts = [self._prompt(t, src, tgt) for t in texts]
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=512,
                       add_special_tokens=self.seq2seq)
        with self.torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        return [s.strip() for s in self.tok.batch_decode(out, skip_special_tokens=True)]


def load_translator(spec: str) -> Translator:
    """`module.path:factory` (any object with .translate) or a local model folder (HFTranslator)."""
    if ":" in spec and not Path(spec).exists():
        mod, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"data.augment.translator: cannot import {spec!r} ({err})") from err
        obj = factory() if callable(factory) and not hasattr(factory, "translate") else factory
        if not hasattr(obj, "translate"):
            raise ConfigError(f"data.augment.translator: {spec!r} has no translate(texts, src, tgt) method")
        return obj
    return HFTranslator(spec)


def _with_user(rec: dict, question: str, context: str | None, method: str, k: int) -> dict:
    """A copy of rec whose last user turn is rebuilt from (question, context)."""
    msgs = [dict(m) for m in rec["messages"]]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last_user]["content"] = user_turn(question, context) if context is not None else question
    fields = dict(rec.get("fields") or {})
    fields["question"] = question
    if context is not None:
        fields["context"] = context
    return {**rec, "id": f"{rec['id']}#aug:{method}:{k}", "messages": msgs, "fields": fields,
            "provenance": f"augmented:{method}", "augmented_from": rec["id"]}


class SynonymBatch:
    """Picklable batch step: records → synonym-replaced variants (None when nothing could be replaced)."""

    def __init__(self, seed: int, prob: float, synonyms_file: str | None, protected: frozenset[str]):
        self.seed, self.prob, self.synonyms_file, self.protected = seed, prob, synonyms_file, protected

    def __call__(self, batch: list[dict]) -> list[dict | None]:
        table = load_synonyms(self.synonyms_file)
        out: list[dict | None] = []
        for rec in batch:
            rng = random.Random(f"{self.seed}:synonym:{rec['id']}")
            f = rec.get("fields") or {}
            q = f.get("question") or next((m["content"] for m in rec["messages"] if m["role"] == "user"), "")
            ctx = f.get("context")
            q2, n1 = synonym_replace(q, rng, table, self.protected, self.prob)
            c2, n2 = synonym_replace(ctx, rng, table, self.protected, self.prob) if ctx else (ctx, 0)
            out.append(_with_user(rec, q2, c2 if "context" in f else None, "synonym", 1) if n1 + n2 else None)
        return out


def template_records(records: list[dict], templates: list[str]) -> list[dict]:
    """One record per (record, template): the user turn rendered from the record's fields with jinja2."""
    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    compiled = []
    for k, t in enumerate(templates):
        try:
            compiled.append(env.from_string(t))
        except TemplateError as err:
            raise ConfigError(f"data.augment.templates[{k}]: not a valid jinja2 template ({err})") from err
    out = []
    for rec in records:
        f = rec.get("fields") or {}
        ctx = {"question": f.get("question", ""), "context": f.get("context", ""), "answer": f.get("answer", ""),
               "domain": rec.get("domain") or "", "label": rec.get("label") or "", "difficulty": rec.get("difficulty") or ""}
        for k, tpl in enumerate(compiled):
            try:
                text = tpl.render(**ctx).strip()
            except TemplateError as err:
                raise ConfigError(f"data.augment.templates[{k}]: {err} (available: {', '.join(ctx)})") from err
            if text:
                out.append(_with_user(rec, text, None, "template", k + 1))
    return out


def back_translate(records: list[dict], translator: Translator, pivot: str = "en", src: str = "zh",
                   batch_size: int = 8) -> list[dict]:
    """question (and context) → pivot language → back; records whose round trip is empty or unchanged are skipped."""
    out = []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        texts = [user_turn((r.get("fields") or {}).get("question", ""), (r.get("fields") or {}).get("context"))
                 or next(m["content"] for m in r["messages"] if m["role"] == "user") for r in batch]
        there = translator.translate(texts, src, pivot)
        back = translator.translate(there, pivot, src)
        for rec, orig, new in zip(batch, texts, back, strict=True):
            new = (new or "").strip()
            if new and new != orig:
                out.append(_with_user(rec, new, None, "back_translation", 1))
    return out


def augment_picks(n_originals: int, ratio: float, method: str, seed: int) -> list[int]:
    """Which original training records (by position, ascending) one augmentation method rewrites."""
    n = min(n_originals, round(n_originals * ratio)) if ratio <= 1 else n_originals
    if n >= n_originals:
        return list(range(n_originals))
    return sorted(random.Random(f"{seed}:augment:{method}").sample(range(n_originals), n))


def augmenter(method: str, acfg, *, seed: int, engine=None, batch_size: int = 500,
              translator: Translator | None = None) -> Callable[[list[dict]], list[dict]]:
    """records → their augmented variants for one method (records it cannot vary are skipped)."""
    if method == "synonym":
        fn = SynonymBatch(seed, acfg.synonym_prob, acfg.synonyms_file,
                          load_protected(acfg.protected_terms, acfg.protected_terms_file))

        def synonyms(sample: list[dict]) -> list[dict]:
            parts = engine.map_batches(fn, sample, batch_size) if engine is not None else [fn(sample)]
            return [r for part in parts for r in part if r is not None]
        return synonyms
    if method == "template":
        if not acfg.templates:
            raise ConfigError("data.augment.methods has 'template' but data.augment.templates is empty")
        return lambda sample: template_records(sample, list(acfg.templates))
    if method == "back_translation":
        if translator is None:
            if not acfg.translator:
                raise ConfigError("data.augment.methods has 'back_translation' but data.augment.translator is not set")
            translator = load_translator(acfg.translator)
        return lambda sample: back_translate(sample, translator, acfg.pivot)
    raise ConfigError(f"data.augment.methods: unknown method {method!r}")  # pragma: no cover - the schema restricts it


def augment_records(train: list[dict], acfg, *, seed: int, engine=None, batch_size: int = 500,
                    translator: Translator | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Augmented variants of a sample of the original training records (the ratio per method); test/eval untouched."""
    originals = [r for r in train if r.get("provenance") == "original"]
    info: dict[str, Any] = {"methods": list(acfg.methods), "ratio": acfg.ratio, "made": {}}
    new: list[dict] = []
    for method in acfg.methods:
        fn = augmenter(method, acfg, seed=seed, engine=engine, batch_size=batch_size, translator=translator)
        made = fn([originals[i] for i in augment_picks(len(originals), acfg.ratio, method, seed)])
        info["made"][method] = len(made)
        new += made
    return new, info
