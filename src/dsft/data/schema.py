"""Schemas → the canonical record: seed {context, question, answer, domain, difficulty}, alpaca, sharegpt, openai, text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsft.data.readers import RawRow
from dsft.data.text import clip
from dsft.errors import DataError
from dsft.records import qa_messages

SCHEMAS = ("seed", "alpaca", "sharegpt", "openai", "text")
META = ("domain", "difficulty", "label")
# Column names recognised without a mapping (canonical field → candidates, first match wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "question": ("question", "title", "query", "q"),
    "context": ("context", "ask", "description", "desc"),
    "answer": ("answer", "response", "reply", "a"),
    "domain": ("domain", "department", "category", "dept"),
    "difficulty": ("difficulty", "level"),
    "label": ("label",),
    "system": ("system",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                "function": "tool"}


class Invalid(Exception):
    """A record that cannot be kept: reason (a short key) + detail (what was wrong)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_schema(rows: list[RawRow], columns: dict[str, str], name: str, header: list[str] | None = None) -> str:
    """Pick one schema for a whole file from its header (CSV/TSV) or the keys of its first records."""
    keys: set[str] = set(header or [])
    for r in ([] if header else rows[:50]):
        if isinstance(r.data, dict):
            keys |= set(r.data)
    keys |= {c for c, s in columns.items() if s in keys}  # mapped columns count under their canonical names
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys and "answer" not in columns:
        return "alpaca"
    seed_map = seed_mapping(keys, columns)
    if "answer" in seed_map and ("question" in seed_map or "context" in seed_map):
        return "seed"
    if "text" in keys or "text" in columns:
        return "text"
    raise DataError(f"{name}: cannot tell the schema from the keys {clip(sorted(keys)[:12])}; expected seed "
                    "{context, question, answer}, alpaca {instruction, output}, sharegpt {conversations}, openai {messages} "
                    "or text {text} — or map your columns with data.columns")


def seed_mapping(keys: set[str] | list[str], columns: dict[str, str]) -> dict[str, str]:
    """canonical field → source column: the config's data.columns first, then the known aliases."""
    keys = set(keys)
    out = dict(columns)
    for canon, cands in ALIASES.items():
        if canon in out:
            continue
        for c in cands:
            if c in keys and c not in out.values():
                out[canon] = c
                break
    return out


def check_mapping(columns: dict[str, str], keys: list[str] | set[str], name: str) -> None:
    """A mapped column that the file does not have is an error (named, with the columns it does have)."""
    keys = set(keys)
    for canon, src in columns.items():
        if src not in keys:
            raise DataError(f"{name}:1: column {clip(repr(src))} (data.columns.{clip(canon)}) not found; "
                            f"the file has: {clip(', '.join(sorted(keys)))}")


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise Invalid("bad_type", f"field '{field}' must be text, got {type(value).__name__}")


def _meta(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of {type: text, text} parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(p.get("text", "")))
            elif isinstance(p, str):
                parts.append(p)
            else:
                raise Invalid("bad_content", f"{where}: only text content parts are supported, got {json.dumps(p, ensure_ascii=False)[:60]}")
        return "".join(parts)
    raise Invalid("bad_type", f"{where}: content must be text, got {type(value).__name__}")


def _tool_calls_text(calls: Any) -> str:
    """OpenAI tool_calls rendered as text (one JSON object per call), so every chat template keeps them."""
    out = []
    for c in calls or []:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append(json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False))
    return "\n".join(out)


def _label(meta: dict[str, Any], fields: dict[str, str], label_field: str | None) -> str | None:
    """The class label: the canonical field named by data.label_field, or that source column."""
    if not label_field or label_field == "label":
        return meta.get("label")
    if label_field in META:
        return meta.get(label_field)
    return _meta(fields.get(label_field)) or meta.get("label")


TOOLS_PREAMBLE = ("Available tools (JSON schema). To call one, answer with a JSON object "
                  '{"name": <tool name>, "arguments": {...}}; its result comes back as a tool message.\n')


def _finish(messages: list[dict[str, str]], fields: dict[str, str], meta: dict[str, Any], row: RawRow,
            label_field: str | None, tools: Any = None, tools_in_system: bool = True) -> dict[str, Any]:
    users = [m for m in messages if m["role"] == "user" and m["content"].strip()]
    if not users:
        raise Invalid("empty_question", "no non-empty user turn")
    if not messages or messages[-1]["role"] != "assistant":
        raise Invalid("no_final_answer", "the conversation does not end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise Invalid("empty_answer", "the last assistant turn is empty")
    label = _label(meta, fields, label_field)
    if tools is not None and not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    if tools and tools_in_system:
        # the model must see the tool schema it is trained to call: render it into the system turn
        text = TOOLS_PREAMBLE + tools
        if messages[0]["role"] == "system":
            messages = [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": text}, *messages]
    return {
        "id": f"{Path(row.file).name}:{row.line}",
        "messages": messages,
        "fields": fields,
        "label": label,
        "domain": meta.get("domain"),
        "difficulty": meta.get("difficulty"),
        "source": {"file": row.file, "line": row.line},
        "provenance": "original",
        "tools": tools,
    }


def to_record(row: RawRow, schema: str, mapping: dict[str, str], label_field: str | None,
              system_prompt: str | None = None, tools_in_system: bool = True) -> dict[str, Any]:
    """One raw row → one canonical record, or Invalid(reason, detail)."""
    if row.error:
        reason, _, detail = row.error.partition(": ")
        raise Invalid(reason, detail or reason)
    d = row.data
    if not isinstance(d, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    if mapping and schema != "seed":
        d = {**d, **{canon: d.get(src) for canon, src in mapping.items() if src in d}}
    meta = {k: _meta(d.get(mapping.get(k, k) if schema == "seed" else k)) for k in META}
    if label_field and label_field not in META and label_field not in ("question", "context", "answer"):
        meta["label"] = _meta(d.get(mapping.get(label_field, label_field)))  # any other column can be the label
    if schema == "seed":
        f = {k: _text(d.get(mapping[k]), k).strip() for k in ("context", "question", "answer") if k in mapping}
        sys_p = _text(d.get(mapping["system"]), "system").strip() if "system" in mapping else ""
        msgs = qa_messages(f, sys_p or system_prompt)
        return _finish(msgs, f, meta, row, label_field)
    if schema == "alpaca":
        ins = _text(d.get("instruction"), "instruction").strip()
        inp = _text(d.get("input"), "input").strip()
        out = _text(d.get("output"), "output").strip()
        sys_p = _text(d.get("system"), "system").strip() or system_prompt
        msgs: list[dict[str, str]] = [{"role": "system", "content": sys_p}] if sys_p else []
        hist = d.get("history") or []
        if not isinstance(hist, list):
            raise Invalid("bad_type", "history must be a list of [question, answer] pairs")
        for k, pair in enumerate(hist):
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise Invalid("bad_history", f"history[{k}] must be a [question, answer] pair")
            msgs += [{"role": "user", "content": _text(pair[0], "history")}, {"role": "assistant", "content": _text(pair[1], "history")}]
        user = f"{ins}\n{inp}" if ins and inp else (ins or inp)
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        return _finish(msgs, {"question": ins, "context": inp, "answer": out}, meta, row, label_field)
    if schema == "sharegpt":
        conv = d.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise Invalid("bad_conversations", "'conversations' must be a non-empty list of {from, value}")
        sys_p = _text(d.get("system"), "system").strip() or system_prompt
        msgs = [{"role": "system", "content": sys_p}] if sys_p else []
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise Invalid("bad_turn", f"conversations[{k}] is not an object")
            who = turn.get("from", turn.get("role"))
            role = SHAREGPT_ROLES.get(str(who))
            if role is None:
                raise Invalid("bad_role", f"conversations[{k}].from = {clip(repr(who))} (expected {', '.join(SHAREGPT_ROLES)})")
            msgs.append({"role": role, "content": _text(turn.get("value", turn.get("content")), f"conversations[{k}].value")})
        return _finish(msgs, _qa_view(msgs), meta, row, label_field, tools=d.get("tools"), tools_in_system=tools_in_system)
    if schema == "openai":
        raw_msgs = d.get("messages")
        if not isinstance(raw_msgs, list) or not raw_msgs:
            raise Invalid("bad_messages", "'messages' must be a non-empty list of {role, content}")
        msgs = []
        if system_prompt and not (isinstance(raw_msgs[0], dict) and raw_msgs[0].get("role") in ("system", "developer")):
            msgs.append({"role": "system", "content": system_prompt})
        for k, m in enumerate(raw_msgs):
            if not isinstance(m, dict):
                raise Invalid("bad_turn", f"messages[{k}] is not an object")
            role = OPENAI_ROLES.get(str(m.get("role")))
            if role is None:
                raise Invalid("bad_role", f"messages[{k}].role = {clip(repr(m.get('role')))} (expected {', '.join(OPENAI_ROLES)})")
            content = _content(m.get("content"), f"messages[{k}]")
            if m.get("tool_calls"):
                calls = _tool_calls_text(m["tool_calls"])
                content = f"{content}\n{calls}" if content.strip() else calls
            msgs.append({"role": role, "content": content})
        return _finish(msgs, _qa_view(msgs), meta, row, label_field, tools=d.get("tools"), tools_in_system=tools_in_system)
    if schema == "text":
        text = _text(d.get("text"), "text").strip()
        if not text:
            raise Invalid("empty_answer", "empty text")
        rec = {"id": f"{Path(row.file).name}:{row.line}", "messages": [{"role": "assistant", "content": text}],
               "fields": {"text": text}, "label": _label(meta, {"text": text}, label_field),
               "domain": meta.get("domain"), "difficulty": meta.get("difficulty"),
               "source": {"file": row.file, "line": row.line}, "provenance": "original", "tools": None}
        return rec
    raise DataError(f"{row.file}: unknown schema '{schema}' (known: {', '.join(SCHEMAS)})")


def _qa_view(msgs: list[dict[str, str]]) -> dict[str, str]:
    """The seed view of a conversation: the first user turn as question, the last assistant turn as answer."""
    q = next((m["content"] for m in msgs if m["role"] == "user"), "")
    a = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
    return {"question": q.strip(), "answer": a.strip()}


def record_text(rec: dict[str, Any], fields: list[str] | None = None) -> str:
    """The text of the given canonical fields (or of all messages when a field is absent) joined by newlines."""
    f = rec.get("fields") or {}
    if fields and all(k in f for k in fields):
        return "\n".join(f[k] for k in fields)
    return "\n".join(m["content"] for m in rec["messages"] if m["role"] != "system")
