"""Template parity: the ids training gives a conversation equal what the chat template gives it at inference.

The reference is the tokenizer's own `apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)`
for the prompt of assistant turn i, followed by the turn as the template writes it after that prompt (its history
form; for templates whose history drops the think block, the turn as generated — see `dsft.model.chat`). Each
path is a function the caller passes (the train encoder, the default engine, vLLM's template, the Ollama Modelfile),
so this shared module checks them without importing a stage. `check_parity` returns a table of every
(conversation, turn, path) with the first differing token position and both decoded snippets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dsft.model.chat import generated_turn, render

TRAIN = "train"
# Train path: (tok, conversation ending with an assistant turn) → (ids, labels) of the row training that turn.
# Prompt paths: (tok, conversation up to that turn) → prompt ids, or None when the path cannot render here.
PathFn = Callable[[Any, list[dict[str, Any]]], Any]

_SYSTEM = {"role": "system", "content": "你是一名全科医生，回答要简洁。"}
_Q1 = {"role": "user", "content": "头痛、发烧三天，应该怎么办？ Headache for 3 days."}
_Q2 = {"role": "user", "content": "还需要吃药吗？"}
_TOOL_CALL = '{"name": "lookup_drug", "arguments": {"name": "布洛芬"}}'
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single-turn": [_Q1, {"role": "assistant", "content": "多休息，多喝水，体温超过38.5℃可服用退烧药。"}],
    "system prompt": [_SYSTEM, _Q1, {"role": "assistant", "content": "先量体温。"}],
    "thinking": [_Q1, {"role": "assistant", "content": "<think>\n发烧三天，需要排除感染。\n</think>\n\n建议去医院查血常规。"}],
    "multi-turn, history think": [
        _SYSTEM, _Q1, {"role": "assistant", "content": "<think>\n先问体温。\n</think>\n\n体温多少度？"},
        {"role": "user", "content": "38.8℃。"},
        {"role": "assistant", "content": "<think>\n高烧，持续三天。\n</think>\n\n请尽快就医。"}, _Q2,
        {"role": "assistant", "content": "遵医嘱服用布洛芬。"}],
    "tool call": [  # dsft's data form: the call as assistant text, the result as a tool message
        _SYSTEM, {"role": "user", "content": "布洛芬一次吃多少？"}, {"role": "assistant", "content": _TOOL_CALL},
        {"role": "tool", "content": '{"dose": "200-400mg", "interval": "4-6h"}'},
        {"role": "assistant", "content": "一次200到400毫克，间隔4到6小时。"}],
}


@dataclass
class Check:
    """One path's ids for one assistant turn of one conversation, against the reference."""

    conversation: str
    turn: int
    path: str
    status: str  # "ok", "diff" or "n/a"
    position: int | None = None
    expected: str = ""
    got: str = ""
    note: str = ""


@dataclass
class ParityTable:
    """Every check of one tokenizer + template; `ok` when no path differs."""

    template: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "diff" for c in self.checks)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(c.path for c in self.checks))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "diff"]

    def failure_line(self) -> str:
        """One line naming the first differing token and both decoded snippets ('' when all agree)."""
        bad = self.failures()
        if not bad:
            return ""
        c = bad[0]
        return (f"template parity ({self.template}): the {c.path} path differs from the tokenizer's apply_chat_template "
                f"at token {c.position} of conversation '{c.conversation}' (assistant turn {c.turn}): "
                f"{c.path} …{c.got!r} vs inference …{c.expected!r}" + (f" ({c.note})" if c.note else ""))

    def lines(self) -> list[str]:
        """The table as text: one row per conversation turn, one column per path."""
        paths = self.paths
        keys = list(dict.fromkeys((c.conversation, c.turn) for c in self.checks))
        cell = {(c.conversation, c.turn, c.path): c for c in self.checks}
        width = max([len(f"{k} #{t}") for k, t in keys] + [12])
        out = [f"{'conversation':<{width}}  " + "  ".join(f"{p:<10}" for p in paths)]
        for k, t in keys:
            row = []
            for p in paths:
                c = cell.get((k, t, p))
                row.append(f"{'—' if c is None else (c.status if c.status != 'diff' else f'≠ @{c.position}'):<10}")
            out.append(f"{f'{k} #{t}':<{width}}  " + "  ".join(row))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def reference_prompt_ids(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The tokenizer's own prompt ids (transformers renders and tokenizes; 5.x returns a BatchEncoding)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return list(out)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


def reference_turn(tok: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int], str]:
    """(prompt ids, completion ids, how the completion was taken) for the conversation's last assistant turn."""
    i = len(messages) - 1
    prompt_ids = reference_prompt_ids(tok, messages[:i])
    prompt = render(tok, messages[:i], add_generation_prompt=True)
    upto = render(tok, messages, add_generation_prompt=False)
    if upto.startswith(prompt):
        return prompt_ids, _ids(tok, upto[len(prompt):]), "history form"
    prev = render(tok, messages[:i], add_generation_prompt=False)
    turn = generated_turn(messages, i, prompt, prev, upto)
    if turn is None:
        return prompt_ids, [], "the template rewrites this turn in a way that has no generation form"
    return prompt_ids, _ids(tok, turn.text), "generated form (history drops the think block)"


def _snippets(tok: Any, expected: list[int], got: list[int], k: int) -> tuple[str, str]:
    lo = max(0, k - 4)
    return tok.decode(expected[lo: k + 4]), tok.decode(got[lo: k + 4])


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two id lists differ (the shorter length when one is a prefix of the other)."""
    k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if k is None and len(a) != len(b):
        k = min(len(a), len(b))
    return k


def _compare(tok: Any, conv: str, turn: int, path: str, expected: list[int], got: list[int] | None,
             note: str = "") -> Check:
    if got is None:
        return Check(conv, turn, path, "n/a", note=note)
    k = first_difference(expected, got)
    if k is None:
        return Check(conv, turn, path, "ok", note=note)
    exp, gt = _snippets(tok, expected, got, k)
    return Check(conv, turn, path, "diff", k, exp, gt, note)


def _check_train(tok: Any, fn: PathFn, conv: str, turn: int, msgs: list[dict[str, Any]]) -> Check:
    prompt_ids, comp_ids, how = reference_turn(tok, msgs)
    ids, labels = fn(tok, msgs)
    expected = prompt_ids + comp_ids
    check = _compare(tok, conv, turn, TRAIN, expected, list(ids), how)
    if check.status == "ok" and list(labels[len(prompt_ids):]) != comp_ids:
        trained = [x for x in labels[len(prompt_ids):] if x != -100]
        check = Check(conv, turn, TRAIN, "diff", len(prompt_ids), tok.decode(comp_ids), tok.decode(trained),
                      f"the loss is not on exactly the turn; {how}")
    return check


def check_parity(tok: Any, paths: dict[str, PathFn], *, template: str = "model",
                 conversations: dict[str, list[dict[str, Any]]] | None = None) -> ParityTable:
    """Check every path on every assistant turn of the conversations (default: CONVERSATIONS) → ParityTable."""
    table = ParityTable(template)
    for name, conv in (conversations or CONVERSATIONS).items():
        turns = [i for i, m in enumerate(conv) if m.get("role") == "assistant"]
        for n, i in enumerate(turns, start=1):
            msgs = conv[: i + 1]
            try:
                expected = reference_prompt_ids(tok, msgs[:i])
                render(tok, msgs, add_generation_prompt=False)
            except Exception as err:  # noqa: BLE001 - the template refuses this conversation (jinja raise_exception)
                table.checks.append(Check(name, n, "reference", "n/a", note=f"template refuses it: {str(err)[:80]}"))
                continue
            for path, fn in paths.items():
                if path == TRAIN:
                    table.checks.append(_check_train(tok, fn, name, n, msgs))
                else:
                    table.checks.append(_compare(tok, name, n, path, expected, fn(tok, msgs[:i])))
    return table
