"""The prompts to distil: any SFT file dsft reads (or RL prompt files) → one prompt item per distinct prompt."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.config.data import DataConfig
from dsft.config.distill import DistillConfig
from dsft.data.load import load_records
from dsft.data.preference import resolve, to_prompt
from dsft.data.readers import read_rows
from dsft.data.schema import Invalid
from dsft.errors import ConfigError, DataError

RL_EMBEDDED = ("embedded:math_zh", "embedded:preference_zh")


@dataclass
class PromptItem:
    """One prompt: stable id (file:line), position in the input, the messages sent, and what verification needs."""

    id: str
    index: int
    messages: list[dict[str, str]]
    reference: str | None
    question: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha(self) -> str:
        """Fingerprint of the messages sent (a resumed run refuses a prompt whose text changed)."""
        raw = json.dumps(self.messages, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return hashlib.sha256(raw).hexdigest()[:16]

    def reward_record(self) -> dict[str, Any]:
        """The record the reward functions see: `answer` is the reference, `meta` the rest."""
        return {"id": self.id, "answer": self.reference, "meta": {**self.meta, "label": self.label}}


def input_paths(dc: DistillConfig) -> list[str]:
    if dc.input is None:
        raise ConfigError("distill.input: no prompt file given (e.g. distill.input: data/questions.jsonl)")
    paths = dc.input if isinstance(dc.input, list) else [dc.input]
    if not paths:
        raise ConfigError("distill.input: no prompt file given")
    return paths


def read_prompts(dc: DistillConfig, reference: str) -> tuple[list[PromptItem], dict[str, Any]]:
    """Every distinct prompt of distill.input (after max_prompts) and the input accounting:
    rows = prompts + invalid + duplicate_prompts + not_sampled (max_prompts)."""
    items: list[PromptItem] = []
    invalid = 0
    for spec in input_paths(dc):
        if dc.format == "rl" or (dc.format == "auto" and spec in RL_EMBEDDED):
            got, bad = _rl_items(spec, dc, reference)
        else:
            got, bad = _sft_items(spec, dc, reference)
        items += got
        invalid += bad
    rows = len(items) + invalid
    items, duplicates = _distinct(items)
    not_sampled = 0
    if dc.max_prompts is not None and len(items) > dc.max_prompts:
        keep = sorted(random.Random(dc.seed).sample(range(len(items)), dc.max_prompts))
        not_sampled = len(items) - len(keep)
        items = [items[i] for i in keep]
    if not items:
        raise DataError(f"{', '.join(input_paths(dc))}: no prompts to distil ({invalid} invalid rows)")
    return items, {"rows": rows, "prompts": len(items), "invalid": invalid, "duplicate_prompts": duplicates,
                   "not_sampled": not_sampled}


def _template(dc: DistillConfig, messages: list[dict[str, str]], fields: dict[str, Any]) -> list[dict[str, str]]:
    msgs = [dict(m) for m in messages]
    if dc.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": dc.system_prompt})
    if dc.prompt_template:
        last = msgs[-1]["content"]
        keys = {"prompt": last, "question": fields.get("question") or last, "context": fields.get("context") or ""}
        try:
            msgs[-1]["content"] = dc.prompt_template.format(**keys)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"distill.prompt_template: {err!r}: allowed keys are {{prompt}}, {{question}}, "
                              f"{{context}} (write literal braces as {{{{ }}}})") from err
    return msgs


def _reference(rec: dict[str, Any], reference: str, answer: str | None) -> str | None:
    if reference == "answer":
        return answer
    if reference == "label":
        return rec.get("label")
    for where in (rec.get("fields") or {}, rec, rec.get("meta") or {}):
        if where.get(reference) not in (None, ""):
            return str(where[reference])
    return None


def _sft_items(spec: str, dc: DistillConfig, reference: str) -> tuple[list[PromptItem], int]:
    d = DataConfig(path=spec, format="auto" if dc.format == "rl" else dc.format, encoding=dc.encoding,
                   columns=dc.columns, label_field=dc.label_field)
    records, rejected, _ = load_records(d)
    items = []
    for rec in records:
        msgs = rec["messages"]
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        cut = assistants[-1] if assistants else len(msgs)
        prompt, answer = msgs[:cut], (msgs[cut]["content"] if assistants else None)
        if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
            rejected.append(rec)
            continue
        fields = rec.get("fields") or {}
        items.append(PromptItem(id=rec["id"], index=0, messages=_template(dc, prompt, fields),
                                reference=_reference(rec, reference, answer), question=prompt[-1]["content"],
                                label=rec.get("label"), meta={k: v for k, v in fields.items() if k != "answer"}))
    return items, len(rejected)


def _rl_items(spec: str, dc: DistillConfig, reference: str) -> tuple[list[PromptItem], int]:
    rows, _ = read_rows(resolve(spec), dc.encoding, spec)
    items, bad = [], 0
    for row in rows:
        try:
            rec = to_prompt(row, None)
        except Invalid:
            bad += 1
            continue
        prompt = rec["prompt"]
        items.append(PromptItem(id=f"{Path(row.file).name}:{row.line}", index=0,
                                messages=_template(dc, prompt, {"question": prompt[-1]["content"]}),
                                reference=_reference(rec, reference, rec["answer"]), question=prompt[-1]["content"],
                                label=rec.get("label"), meta=dict(rec.get("meta") or {})))
    return items, bad


def _distinct(items: list[PromptItem]) -> tuple[list[PromptItem], int]:
    """Drop repeated prompts (same messages: sampling them twice wastes budget); make ids unique; set index."""
    seen_sha: set[str] = set()
    seen_id: dict[str, int] = {}
    out = []
    for it in items:
        if it.sha in seen_sha:
            continue
        seen_sha.add(it.sha)
        n = seen_id.get(it.id, 0)
        seen_id[it.id] = n + 1
        if n:
            it.id = f"{it.id}#{n}"
        it.index = len(out)
        out.append(it)
    return out, len(items) - len(out)
