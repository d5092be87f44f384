"""A conversation as the model sees it: each assistant turn right after the exact prompt inference renders.

The tokenizer's chat template is the truth at inference: the prompt of an assistant turn is
`apply_chat_template(messages[:i], add_generation_prompt=True)`, and the model then writes the turn. Training must
show the same prompt and the same turn. Most DeepSeek templates render a history turn exactly as it follows the
generation prompt (V3, V2.5, V3.1 non-thinking): the whole conversation is one training row. R1 and R1-Distill
(generation prompt `<｜Assistant｜><think>\\n`) and V3.1 in thinking mode (`<｜Assistant｜><think>`) open a think
block that their history rendering drops (R1's rule: history turns lose their `<think>` content). For them the
trained turn is what the model generates after that prompt — its think block (or R1's empty one,
`<think>\\n\\n</think>\\n\\n`, for an answer without reasoning) and the answer as the template writes it — and a
later turn, whose history no longer holds that think block, starts a new row whose prompt is again the template's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<think>", "</think>"


@dataclass
class Piece:
    """A run of text in a training row: trained (loss on) or not; think: the think block's span in text."""

    text: str
    trained: bool
    think: tuple[int, int] | None = None


def render(tok: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    """The chat template's text for messages (the tokenizer's own apply_chat_template)."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def think_opening(prompt: str) -> str | None:
    """The think block a generation prompt leaves open ('<think>\\n' for R1, '<think>' for V3.1), or None."""
    i = prompt.rfind(OPEN)
    if i < 0 or CLOSE in prompt[i:]:
        return None
    return prompt[i:]


def _think_block(message: dict[str, Any], opening: str) -> tuple[str, bool]:
    """(the turn's think block incl. its tags, whether it was written inline in content)."""
    content = message.get("content") or ""
    if CLOSE in content:
        return content[: content.index(CLOSE) + len(CLOSE)], True
    nl = "\n" if opening.endswith("\n") else ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip():
        return f"{opening}{reasoning}{nl}{CLOSE}", False
    return f"{opening}{nl}{CLOSE}", False  # R1's convention for an answer without reasoning: an empty think block


def _think_span(text: str) -> tuple[int, int] | None:
    end = text.find(CLOSE)
    if end < 0:
        return None
    start = text.find(OPEN)
    return (start if 0 <= start < end else 0), end + len(CLOSE)


def generated_turn(messages: list[dict[str, Any]], i: int, prompt: str, prev: str, upto: str) -> Piece | None:
    """Assistant turn i as the model generates it after `prompt`, or None when the template hides how.

    prev / upto: the template's rendering of messages[:i] / messages[:i+1] without a generation prompt."""
    if upto.startswith(prompt):  # the template writes the turn right after its generation prompt
        text = upto[len(prompt):]
        m = messages[i]
        has_think = CLOSE in (m.get("content") or "")
        return Piece(text, True, _think_span(text) if has_think else None)
    opening = think_opening(prompt)
    if opening is None or not (prompt.startswith(prev) and upto.startswith(prev)):
        return None
    role = prompt[len(prev): len(prompt) - len(opening)]  # e.g. '<｜Assistant｜>'
    hist = upto[len(prev):]
    if not hist.startswith(role):
        return None
    body = hist[len(role):]  # the answer as history shows it (think dropped) + the end-of-turn token
    if body.startswith(CLOSE):  # V3.1 marks a non-thinking history turn with '</think>'
        body = body[len(CLOSE):]
    think, inline = _think_block(messages[i], opening)
    sep = "\n\n" if not inline and opening.endswith("\n") and not body[:1].isspace() else ""
    full = think + sep + body
    text = full[len(opening):] if full.startswith(opening) else full
    return Piece(text, True, _think_span(text))


def _history_turn(messages: list[dict[str, Any]], i: int, upto: str, cursor: int) -> tuple[Piece, Piece] | None:
    """Fallback for templates that rewrite a turn in a way dsft cannot undo: the turn as history shows it."""
    content = messages[i].get("content") or ""
    start = upto.find(content, cursor) if content else -1
    if start < 0:
        return None
    return Piece(upto[:start], False), Piece(upto[start:], True)


def training_rows(tok: Any, messages: list[dict[str, Any]]) -> list[list[Piece]]:
    """The rows a conversation trains as: pieces whose trained parts are its assistant turns (see module doc)."""
    rows: list[list[Piece]] = []
    row: list[Piece] = []
    seen = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = render(tok, messages[:i], add_generation_prompt=True) if i else ""
        prev = render(tok, messages[:i], add_generation_prompt=False) if i else ""
        upto = render(tok, messages[: i + 1], add_generation_prompt=False)
        turn = generated_turn(messages, i, prompt, prev, upto)
        if turn is not None:
            head = Piece(prompt, False)
        else:
            pair = _history_turn(messages, i, upto, len(prev))
            if pair is None:
                continue
            head, turn = pair
        if not turn.text:
            continue
        if row and head.text.startswith(seen):
            row.append(Piece(head.text[len(seen):], False))
        else:
            if row:
                rows.append(row)
            row = [head]
        row.append(turn)
        seen = head.text + turn.text
    if row:
        rows.append(row)
    return rows
