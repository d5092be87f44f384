"""The canonical record every stage exchanges, and the prompts derived from it (shared by train and eval)."""

from __future__ import annotations

from typing import Any

# A canonical record (one JSON object per line in the data stage's train/eval/test .jsonl files):
# {
#   "id": "medical_qa_subset.gb18030.csv:12",          # source file name + line (1-based, header = line 1)
#   "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
#   "fields": {"context": str, "question": str, "answer": str},   # seed schema view (may be partial)
#   "label": str | None, "domain": str | None, "difficulty": str | None,
#   "source": {"file": str, "line": int},
#   "provenance": "original" | "derived:label_task" | "augmented:<method>",
#   "tools": str | None                                 # sharegpt tool schema, verbatim
# }


def user_turn(question: str, context: str | None) -> str:
    """The user message of a QA record: the question, then its context (the seed's ask) if any."""
    question = (question or "").strip()
    context = (context or "").strip()
    if question and context and context != question:
        return f"{question}\n{context}"
    return question or context


def qa_messages(fields: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """Messages of a seed-schema record: [system], user(question + context), assistant(answer)."""
    msgs: list[dict[str, str]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": user_turn(fields.get("question", ""), fields.get("context"))})
    msgs.append({"role": "assistant", "content": str(fields.get("answer", "")).strip()})
    return msgs


def label_prompt_messages(record: dict[str, Any], label_prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The classification prompt of a record (no answer): the same text in training and in eval."""
    f = record.get("fields") or {}
    question = f.get("question") or _first_user(record)
    text = label_prompt.format(question=question, context=f.get("context", ""))
    msgs: list[dict[str, str]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": text})
    return msgs


def prompt_and_reference(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Split a record into (messages up to the last assistant turn, that turn's text) for generation eval."""
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def _first_user(record: dict[str, Any]) -> str:
    for m in record.get("messages", []):
        if m["role"] == "user":
            return m["content"]
    return ""


def read_json_lines(path, what: str = "file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a UTF-8 JSONL file; one-line DataError naming the file and
    line otherwise (`what` names the file in the not-found and empty messages)."""
    import json
    from pathlib import Path

    from dsft.errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: {what} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 ({err.reason} at byte {err.start})") from err
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}:{n}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise DataError(f"{p}: no records (empty {what})")
    return rows


def read_records_file(path) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Records from a JSONL of dsft records (`messages`) or seed rows (question/answer[/context][/domain]), and
    their label set (None with fewer than two labels). Bad lines raise DataError naming file and line."""
    from dsft.errors import DataError

    records = []
    for i, row in read_json_lines(path, "--eval-data file"):
        if row.get("messages"):
            records.append(row)
        elif row.get("question") and row.get("answer"):
            fields = {k: row.get(k) for k in ("question", "context", "answer") if row.get(k)}
            records.append({"messages": qa_messages(fields), "fields": fields, "label": row.get("label") or row.get("domain")})
        else:
            raise DataError(f"{path}:{i}: expected a record with 'messages' or 'question' + 'answer'")
    labels = sorted({str(r["label"]) for r in records if r.get("label") is not None})
    return records, labels if len(labels) >= 2 else None
