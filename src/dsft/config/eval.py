"""`eval:` section — held-out evaluation, metrics, reports."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section


class EvalConfig(Section):
    max_samples: int | None = Field(64, gt=0)
    """Evaluate on at most this many held-out records (deterministic), None = all."""
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    lang: Literal["auto", "zh", "en"] = "auto"
    metrics: list[str] = Field(default_factory=lambda: ["loss", "perplexity", "rouge_l", "bleu", "accuracy", "macro_f1"])
    """Rows of the `dsft eval` summary (every metric is always computed and written to eval.json): loss, perplexity,
    rouge_1, rouge_2, rouge_l, bleu, f1, em, accuracy, macro_f1, auc, latency_ms_per_sample, ms_per_new_token."""
    compare_base: bool = True
    no_repeat_ngram_size: int = Field(3, ge=0)
    """Greedy decoding never repeats an n-gram of this many tokens (0 = off); 3 keeps small models from looping."""
    repetition_penalty: float = Field(1.0, gt=0)
    label_scoring: Literal["sum", "mean"] = "sum"
    """How a label's log-likelihood is aggregated over its tokens (sum = full-sequence probability)."""
    breakdown_fields: list[str] = Field(default_factory=lambda: ["domain", "difficulty"])
    """Record fields to break metrics down by (groups with a single value are skipped)."""
    samples_in_report: int = Field(8, ge=0)
    """Side-by-side generations shown in report.md / report.html."""
    contamination_ngram: int = Field(8, gt=0)
    """n (in characters for Chinese, words otherwise) of the eval-vs-train overlap check."""
    contamination_threshold: float = Field(0.5, gt=0, le=1)
    """Flag an eval item when this fraction of its n-grams occur in one training item."""
    during_training_metric: str = "eval_loss"
    """Metric that drives early stopping: eval_loss, perplexity (lower is better) or rouge_l, bleu, f1, em (higher)."""
    during_training_samples: int = Field(16, gt=0)
    """Size of the fixed held-out subset scored during training."""
    backend: Literal["transformers", "vllm", "auto"] = "transformers"
    """Generation backend; vllm (GPU, optional extra) or auto = vllm when installed and CUDA is available."""
    variants: list[str] | None = None
    """Export variants to compare when the export stage already ran (names from its manifest, e.g. merged, int8);
    None = every variant this backend can load (GGUF is skipped)."""
    merge_adapter: bool = True
    """Merge a LoRA adapter into the in-memory base before scoring the fine-tuned model (same numbers up to float
    rounding, decoding as fast as the exported model); false scores the unmerged PEFT model."""
    generative_classification: bool = True
    """Also ask the label question by generation and count answers that name the right label (`gen_accuracy`),
    next to the log-likelihood classification (`accuracy`, `macro_f1`, `auc`)."""
    label_max_new_tokens: int = Field(8, gt=0)
    """New tokens generated for that free-text label answer."""
