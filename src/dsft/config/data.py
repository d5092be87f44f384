"""`data:` section — where the data is, how to map and clean it, how to split it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsft.config.base import Section

EMBEDDED_DATA = "embedded:medical"


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
    """Where the batch steps run: this process (local) or Ray Data (`pip install dsft[ray]`); same output bytes."""
