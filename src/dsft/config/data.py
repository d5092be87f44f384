"""`data:` section — where the data is, how to map and clean it, how to split it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section

EMBEDDED_DATA = "embedded:medical"


class NearDedupConfig(Section):
    """MinHash + LSH near-duplicate removal (character n-grams for CJK, word n-grams for spaced text)."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity of the shingle sets above which two records are near-duplicates."""
    fields: list[str] | None = None
    """Canonical fields compared (default: data.dedup_fields); a record without them uses its whole conversation."""
    ngram: int = Field(5, ge=1, le=64)
    """Character n-gram size for CJK text (NFKC, lowercase, whitespace/punctuation stripped)."""
    word_ngram: int = Field(3, ge=1, le=32)
    """Word n-gram size for space-separated text."""
    num_perm: int = Field(128, ge=8, le=1024)
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    """LSH bands × rows; default derived from threshold and num_perm (recall-weighted)."""
    verify: Literal["exact", "minhash", "none"] = "exact"
    """Check candidate pairs by exact Jaccard of the shingle sets (default), by the MinHash estimate, or not at all."""
    seed: int = 1


class QualityConfig(Section):
    """Quality filters for SFT pairs; each is off when its threshold is None / False."""

    enabled: bool = True
    min_chars: dict[str, int] = Field(default_factory=lambda: {"answer": 2})
    """Minimum characters per canonical field (question, context, answer)."""
    max_chars: dict[str, int] = Field(default_factory=dict)
    min_tokens: dict[str, int] = Field(default_factory=dict)
    max_tokens: dict[str, int] = Field(default_factory=dict)
    """Token limits per field (plus `conversation` for the whole rendered chat), counted with `tokenizer`."""
    tokenizer: str | None = None
    """Tokenizer for token counts (folder or real DeepSeek name; default: model.tokenizer or the embedded one)."""
    min_answer_question_ratio: float | None = None
    max_answer_question_ratio: float | None = None
    max_char_repetition: float | None = 0.5
    """Drop when more than this share of the answer's character 10-grams are repeats (looping generations)."""
    max_special_char_ratio: float | None = 0.4
    """Drop when more than this share of the answer is neither letter, digit, space nor common punctuation."""
    require_terminal_punctuation: bool = False
    """Answer completeness: the answer must end with 。？！.?!…」”) etc."""
    drop_refusals: bool = True
    """Drop boilerplate / refusal answers (作为一个AI…, I'm sorry, but I can't…)."""
    extra_patterns: list[str] = Field(default_factory=list)
    """More regular expressions; an answer matching one is dropped as boilerplate."""
    pii: Literal["off", "mask", "drop"] = "mask"
    """Phone numbers, Chinese ID numbers, e-mail addresses: mask them ([PHONE] …), drop the record, or leave them."""
    decontaminate: list[str] = Field(default_factory=list)
    """Eval/benchmark files (any readable format); training records sharing an n-gram with them are dropped."""
    decontam_ngram: int = Field(13, ge=4)
    """n-gram size for decontamination (characters for CJK, words for spaced text)."""


class BalanceConfig(Section):
    """Class balancing of the training split (test/eval keep the real distribution)."""

    method: Literal["none", "cap", "floor", "cap_floor", "temperature"] = "none"
    cap: int | None = Field(None, ge=1)
    """cap: undersample every class to at most this many records."""
    floor: int | None = Field(None, ge=1)
    """floor: oversample (repeat) every class to at least this many records."""
    temperature: float = Field(0.5, gt=0, le=1)
    """temperature: class share ∝ n^T (1 = unchanged, → 0 = uniform), same total size."""


class AugmentConfig(Section):
    """Training-set augmentation; marked `provenance: augmented:<method>`, never in test/eval."""

    methods: list[Literal["synonym", "back_translation", "template"]] = Field(default_factory=list)
    ratio: float = Field(0.0, ge=0, le=10)
    """Augmented records per training record (per method; 0.3 = 30 % of the records get one variant)."""
    synonym_prob: float = Field(0.2, gt=0, le=1)
    """Share of replaceable words swapped for a synonym."""
    synonyms_file: str | None = None
    """Extra synonym list: one group per line, words separated by spaces (the first may be a Cilin code)."""
    protected_terms: list[str] = Field(default_factory=list)
    protected_terms_file: str | None = None
    """Terms never replaced (drug names, diseases …), one per line; numbers are always protected."""
    translator: str | None = None
    """Back-translation: a local seq2seq or causal-LM folder used as translator (zh → pivot → zh)."""
    pivot: str = "en"
    templates: list[str] = Field(default_factory=list)
    """Jinja2 templates for the user turn, filled from the record's fields (question, context, domain …)."""


class DataConfig(Section):
    path: str | list[str] = EMBEDDED_DATA
    """File(s) to read, or `embedded:medical` (the packaged subset of the medical QA corpus)."""
    format: Literal["auto", "seed", "alpaca", "sharegpt", "openai", "csv", "text"] = "auto"
    encoding: str = "auto"
    """`auto` detects UTF-8 / UTF-8-BOM / GB18030; or name one (gb18030, gbk, utf-8 …)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map canonical field → source column, e.g. {question: title, context: ask, answer: answer, domain: department}."""
    label_field: str | None = "domain"
    """Canonical field whose value is the class label (used for stratified split, classification eval)."""
    system_prompt: str | None = None
    tools_in_system: bool = True
    """Render a record's tool schema (sharegpt/OpenAI `tools`) into its system turn, so the model sees what it calls."""
    think_in_loss: bool = True
    """Train on the `<think>…</think>` block of assistant turns; false masks it from the loss (labels -100), so only
    the answer after it is learned (R1-style reasoning data whose traces you keep as context, not as targets)."""
    label_prompt: str | None = "{question}\n请问这个问题应该挂哪个科室？"
    """Prompt of the derived classification task (format keys: question, context). None disables the task."""
    label_task_in_train: bool = True
    """Add one derived classification conversation per training record (the label as the answer)."""
    test_size: float = Field(0.1, gt=0, lt=1)
    eval_size: float = Field(0.0, ge=0, lt=1)
    max_samples: int | None = Field(None, gt=0)
    """Use at most this many input records (deterministic sample by seed)."""
    max_seq_length: int = Field(512, gt=8)
    dedup_exact: bool = True
    dedup_fields: list[str] = Field(default_factory=lambda: ["question", "answer"])
    seed: int = 42
    strict: bool = False
    """Fail on the first invalid record (file, line, what was wrong) instead of writing it to rejected.jsonl."""
    engine: Literal["local", "ray"] = "local"
    """Where the batch steps run: this process and a worker pool (local) or Ray Data (`pip install dsft[ray]`)."""
    batch_size: int = Field(2000, ge=1)
    """Records per batch of the batch steps (validation filters, shingling, decontamination, synonyms)."""
    workers: int = Field(2, ge=1)
    """Local engine: processes for the batch steps on large inputs (small inputs run in-process)."""
    streaming: bool = False
    """Keep the records in work files instead of memory (inputs larger than memory); the outputs are the same bytes."""
    shuffle_buffer: int = Field(10_000, ge=1)
    """Unused: `dsft data prepare` splits exactly, streaming or not (a warning says so); see `dsft data split --buffer`."""
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    report_plots: bool = True
    """Write PNG histograms next to data_report.md."""
