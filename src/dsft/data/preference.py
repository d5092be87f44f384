"""Data stage for preference pairs (dpo / orpo / simpo) and RL prompts (grpo): read → validate → exact dedup →
decontaminate → split → write, with the same accounting as SFT data (input = kept + Σ dropped).

Pairs: `{prompt | instruction[+input] | question | messages | conversations, chosen, rejected[, system]}` where
the prompt is text or turns (OpenAI `messages` / sharegpt `conversations` ending with a user turn) and chosen /
rejected are text, an assistant message, a sharegpt turn, or turns ending with the assistant's answer.
RL prompts: `{prompt | question | problem | instruction | messages | conversations[, answer | solution |
ground_truth][, anything else → meta]}`. `train.objective` decides which one the data stage reads.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.config.preference import PREFERENCE_OBJECTIVES
from dsft.data.load import data_paths
from dsft.data.readers import RawRow, read_rows, resolve_path
from dsft.data.schema import OPENAI_ROLES, SHAREGPT_ROLES, Invalid
from dsft.errors import DataError
from dsft.run import RunDir, atomic_write_json, atomic_write_text, write_jsonl

EMBEDDED = {"embedded:preference_zh": "preference_zh.jsonl", "embedded:math_zh": "math_rl_zh.jsonl"}
PROMPT_KEYS = ("prompt", "instruction", "question", "problem", "messages", "conversations")
ANSWER_KEYS = ("answer", "solution", "ground_truth")


def resolve(spec: str) -> Path:
    """The packaged samples by name, else what the SFT readers accept."""
    if spec in EMBEDDED:
        return Path(str(resources.files("dsft") / "assets" / "data" / EMBEDDED[spec]))
    return resolve_path(spec)


# ---------------------------------------------------------------- one row → one record
def _text(v: Any, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    raise Invalid("bad_type", f"{where}: expected text, got {type(v).__name__}")


def _turns(v: Any, where: str) -> list[dict[str, str]]:
    """Text, one message, or a list of OpenAI / sharegpt messages → [{role, content}]."""
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    items = [v] if isinstance(v, dict) else v
    if not isinstance(items, list) or not items:
        raise Invalid("bad_turns", f"{where}: expected text or a non-empty list of messages")
    out = []
    for k, m in enumerate(items):
        if not isinstance(m, dict):
            raise Invalid("bad_turn", f"{where}[{k}] is not an object")
        who = m.get("role", m.get("from"))
        role = OPENAI_ROLES.get(str(who)) or SHAREGPT_ROLES.get(str(who))
        if role is None:
            raise Invalid("bad_role", f"{where}[{k}]: unknown role {str(who)[:40]!r}")
        out.append({"role": role, "content": _text(m.get("content", m.get("value", "")), f"{where}[{k}].content")})
    return out


def _prompt(d: dict, system: str | None) -> list[dict[str, str]]:
    key = next((k for k in PROMPT_KEYS if d.get(k) not in (None, "", [])), None)
    if key is None:
        raise Invalid("no_prompt", f"no prompt (expected one of {', '.join(PROMPT_KEYS)})")
    if key == "instruction" and d.get("input"):
        msgs = [{"role": "user", "content": f"{_text(d['instruction'], 'instruction')}\n{_text(d['input'], 'input')}"}]
    else:
        msgs = _turns(d[key], key)
    sys_p = d.get("system") or system
    if sys_p and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": _text(sys_p, "system")}, *msgs]
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise Invalid("prompt_not_ending_with_user", f"{key}: the prompt must end with a non-empty user turn")
    return msgs


def _answer(v: Any, where: str) -> str:
    """chosen / rejected as text: a string, an assistant message, or turns whose last one is the assistant's."""
    if v is None:
        raise Invalid(f"no_{where}", f"missing '{where}'")
    if isinstance(v, str):
        text = v
    else:
        turns = _turns(v, where)
        if turns[-1]["role"] != "assistant" and not isinstance(v, dict):
            raise Invalid("bad_answer", f"{where}: the last turn must be the assistant's answer")
        text = turns[-1]["content"]
    if not text.strip():
        raise Invalid(f"empty_{where}", f"'{where}' is empty")
    return text.strip()


def to_pair(row: RawRow, system: str | None) -> dict[str, Any]:
    d = _row_dict(row)
    prompt = _prompt(d, system)
    chosen, rejected = _answer(d.get("chosen"), "chosen"), _answer(d.get("rejected"), "rejected")
    if chosen == rejected:
        raise Invalid("identical_answers", "chosen and rejected are the same text")
    return {"id": f"{Path(row.file).name}:{row.line}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "messages": [*prompt, {"role": "assistant", "content": chosen}], "label": None,
            "source": {"file": row.file, "line": row.line}, "provenance": "original"}


def to_prompt(row: RawRow, system: str | None) -> dict[str, Any]:
    d = _row_dict(row)
    prompt = _prompt(d, system)
    key = next((k for k in ANSWER_KEYS if d.get(k) not in (None, "")), None)
    answer = _text(d[key], key).strip() if key else None
    meta = {k: v for k, v in d.items() if k not in (*PROMPT_KEYS, *ANSWER_KEYS, "input", "system")}
    rec = {"id": f"{Path(row.file).name}:{row.line}", "prompt": prompt, "answer": answer, "meta": meta,
           "label": None, "source": {"file": row.file, "line": row.line}, "provenance": "original"}
    if answer is not None:  # eval / export see a normal conversation with the reference answer
        rec["messages"] = [*prompt, {"role": "assistant", "content": answer}]
    return rec


def _row_dict(row: RawRow) -> dict:
    if row.error:
        reason, _, detail = row.error.partition(": ")
        raise Invalid(reason, detail or reason)
    if not isinstance(row.data, dict):
        raise Invalid("not_an_object", f"expected an object, got {type(row.data).__name__}")
    return row.data


def prompt_text(rec: dict) -> str:
    return "\n".join(m["content"] for m in rec["prompt"] if m["role"] != "system")


# ---------------------------------------------------------------- the stage
def run(cfg: Config, run_dir: RunDir, *, force: bool = False) -> dict[str, Any]:
    """Prepare preference pairs or RL prompts into `<run_dir>/data/`; returns the manifest."""
    d = cfg.data
    kind = "preference" if cfg.train.objective in PREFERENCE_OBJECTIVES else "prompts"
    convert = to_pair if kind == "preference" else to_prompt
    out_dir = run_dir.prepare_stage("data", force=force)
    dropped: Counter[str] = Counter()
    rejected: list[dict] = []
    kept: list[dict] = []
    infos = []
    for spec in data_paths(d):
        path = resolve(spec)
        rows, info = read_rows(path, d.encoding, spec if spec.startswith("embedded:") else str(path))
        infos.append(info)
        for row in rows:
            try:
                kept.append(convert(row, d.system_prompt))
            except Invalid as bad:
                if d.strict:
                    raise DataError(f"{row.file}:{row.line}: {bad.reason}: {bad.detail} (--strict)") from None
                rejected.append({"file": row.file, "line": row.line, "reason": bad.reason, "detail": bad.detail})
                dropped[bad.reason] += 1
    n_input = len(kept) + sum(dropped.values())
    if n_input == 0:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no records (empty dataset)")
    kept, dups = _dedup(kept, kind)
    dropped["duplicate"] += len(dups)
    if d.quality.decontaminate:
        kept = _decontaminate(kept, d, dropped, rejected)
    if not kept:
        raise DataError(f"{', '.join(i['file'] for i in infos)}: no {kind} record left (dropped {dict(dropped)}); "
                        f"see {out_dir / 'rejected.jsonl'}")
    splits = _split(kept, d.test_size, d.eval_size, d.seed)
    for name, recs in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", recs)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    write_jsonl(out_dir / "duplicates.jsonl", dups)
    counts = {"input": n_input, "kept": len(kept), "dropped": {k: v for k, v in sorted(dropped.items()) if v},
              "train": len(splits["train"]), "test": len(splits["test"]), "eval": len(splits["eval"]), "derived": 0}
    if counts["input"] != counts["kept"] + sum(counts["dropped"].values()):  # pragma: no cover - an invariant
        raise DataError(f"internal accounting error: {counts}")
    report = {"kind": kind, "objective": cfg.train.objective, "files": infos, "counts": counts,
              "accounting_holds": True, "with_answer": sum(1 for r in kept if r.get("answer") is not None)}
    atomic_write_json(out_dir / "data_report.json", report)
    atomic_write_text(out_dir / "data_report.md", _report_md(report))
    manifest = {"train": "train.jsonl", "test": "test.jsonl", "eval": "eval.jsonl", "report": "data_report.json",
                "counts": counts, "labels": [], "label_field": None, "kind": kind}
    run_dir.write_manifest("data", manifest)
    return manifest


def _key(rec: dict, kind: str) -> str:
    parts = [prompt_text(rec)] + ([rec["chosen"], rec["rejected"]] if kind == "preference" else [])
    return hashlib.sha256("\x00".join(" ".join(p.split()) for p in parts).encode()).hexdigest()


def _dedup(recs: list[dict], kind: str) -> tuple[list[dict], list[dict]]:
    """Exact duplicates (same prompt, and same answers for pairs; whitespace ignored): the first is kept."""
    seen: dict[str, str] = {}
    keep, dups = [], []
    for r in recs:
        k = _key(r, kind)
        if k in seen:
            dups.append({"id": r["id"], "duplicate_of": seen[k], "reason": "duplicate"})
        else:
            seen[k] = r["id"]
            keep.append(r)
    return keep, dups


def _decontaminate(recs: list[dict], d, dropped: Counter, rejected: list[dict]) -> list[dict]:
    """Drop records whose prompt (or answers) share an n-gram with the eval files of data.quality.decontaminate."""
    from dsft.data.decontam import ContaminationCheck, ngram_set

    q = d.quality
    texts = []
    for spec in q.decontaminate:
        rows, _ = read_rows(resolve(spec), d.encoding)
        texts += [" ".join(str(v) for v in r.data.values() if isinstance(v, str)) if isinstance(r.data, dict)
                  else str(r.data) for r in rows]
    hits = ContaminationCheck(ngram_set(texts, q.decontam_ngram), q.decontam_ngram)(
        [prompt_text(r) + "\n" + (r.get("chosen") or r.get("answer") or "") for r in recs])
    keep = []
    for r, h in zip(recs, hits, strict=True):
        if h:
            dropped["contaminated"] += 1
            rejected.append({"file": r["source"]["file"], "line": r["source"]["line"], "id": r["id"],
                             "reason": "contaminated", "detail": f"shares {int(h)} {q.decontam_ngram}-grams"})
        else:
            keep.append(r)
    return keep


def _split(recs: list[dict], test_size: float, eval_size: float, seed: int) -> dict[str, list[dict]]:
    """A seeded shuffle: round(n·test_size) test (≥ 1 from 3 records), round(n·eval_size) eval, the rest train."""
    idx = list(range(len(recs)))
    random.Random(f"{seed}:pairs").shuffle(idx)
    n = len(recs)
    n_test = max(1 if n >= 3 else 0, round(n * test_size))
    n_eval = min(max(1 if eval_size and n >= 4 else 0, round(n * eval_size)), max(0, n - n_test - 1))
    where = {i: ("test" if k < n_test else "eval" if k < n_test + n_eval else "train") for k, i in enumerate(idx)}
    return {s: [recs[i] for i in range(n) if where[i] == s] for s in ("train", "test", "eval")}


def _report_md(rep: dict) -> str:
    c = rep["counts"]
    lines = [f"# Data report ({rep['kind']}, objective {rep['objective']})", "",
             f"- input {c['input']} = kept {c['kept']} + dropped {sum(c['dropped'].values())} "
             f"({json.dumps(c['dropped'], ensure_ascii=False)})",
             f"- train {c['train']}, test {c['test']}, eval {c['eval']}",
             f"- files: {', '.join(i['file'] for i in rep['files'])}"]
    if rep["kind"] == "prompts":
        lines.append(f"- prompts with a reference answer: {rep['with_answer']} of {c['kept']}")
    return "\n".join(lines) + "\n"
