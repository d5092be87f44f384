"""Verifiable reward functions for GRPO (and anything else that scores completions): exact / numeric answers
(`\\boxed{}` aware), multiple-choice labels, regex, JSON schema, the R1 `<think>…</think>` format, length, and user
functions named by a Python entry point `module:function`.

Every function has the signature fn(completion: str, record: dict, **args) → float, where `record` is the RL
prompt record (`answer`, `meta`, `id`, …). `load_rewards` turns config specs into callables; `score` applies them
and turns an exception inside a reward function into one clear RewardError naming the function and the record.
Nothing here imports torch or a stage: dsft.train (GRPO) and other stages (distillation filters) share it.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dsft.errors import ConfigError, TrainError

RewardFn = Callable[..., float]


class RewardError(TrainError):
    """A reward function raised or returned something that is not a finite number."""


# ---------------------------------------------------------------- answer extraction
def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` (or `\\fbox{…}`) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def after_think(text: str) -> str:
    """The answer part of an R1-style completion: what follows the last `</think>` (the whole text if none)."""
    k = text.rfind("</think>")
    return text[k + len("</think>"):] if k >= 0 else text


ANSWER_CUE = re.compile(r"(?:答案|最终答案|answer|Answer|ANSWER)\s*(?:是|为|is)?\s*[:：]?\s*(.+)")


def extract_answer(text: str) -> str:
    """The final answer of a completion: the last \\boxed{}, else the text after a cue (答案：/ Answer:), else the
    last non-empty line of the part after `</think>`."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tail = after_think(text).strip()
    cues = ANSWER_CUE.findall(tail)
    if cues:
        return cues[-1].strip()
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_text(s: str) -> str:
    """NFKC, lower case, no spaces, no trailing punctuation, no `$` / `\\text{}` wrappers."""
    s = unicodedata.normalize("NFKC", str(s)).strip().lower()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s).replace("$", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip("。.!！?？,，;；")


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(s: str) -> float | None:
    """A number from text: 1,234 / -3.5 / 3/4 / \\frac{3}{4} / 50% (as 50); None when there is none."""
    s = unicodedata.normalize("NFKC", str(s))
    frac = re.search(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if frac:
        den = float(frac.group(2))
        return float(frac.group(1)) / den if den else None
    found = NUMBER.findall(s)
    if not found:
        return None
    tok = found[-1].replace(",", "")
    try:
        if "/" in tok:
            a, b = tok.split("/")
            return float(a) / float(b) if float(b) else None
        return float(tok)
    except ValueError:
        return None


def _reference(record: dict[str, Any], key: str = "answer") -> str:
    ans = record.get(key)
    if ans is None:
        ans = (record.get("meta") or {}).get(key)
    if ans is None:
        raise ValueError(f"the record has no '{key}' to compare with")
    return str(ans)


# ---------------------------------------------------------------- built-in rewards
def exact(completion: str, record: dict[str, Any], *, key: str = "answer", extract: bool = True, **_: Any) -> float:
    """1 when the final answer equals the record's answer (normalised text), else 0. extract=False compares the
    whole answer part (after `</think>`), so a completion cannot list several guesses and score with the last."""
    got = extract_answer(completion) if extract else after_think(completion)
    return float(normalize_text(got) == normalize_text(_reference(record, key)))


def numeric(completion: str, record: dict[str, Any], *, key: str = "answer", rel_tol: float = 1e-6,
            abs_tol: float = 1e-9, extract: bool = True, **_: Any) -> float:
    """1 when the final answer's number equals the record's (\\boxed{} first, else the last number), else 0;
    falls back to exact text match when the reference is not a number. extract=False: the answer part must hold
    exactly one number (no scoring by listing several)."""
    ref_text = _reference(record, key)
    ref = parse_number(last_boxed(ref_text) or ref_text)
    if ref is None:
        return exact(completion, record, key=key, extract=extract)
    part = extract_answer(completion) if extract else after_think(completion).strip()
    if not extract and len(NUMBER.findall(part)) != 1:
        return 0.0
    got = parse_number(part)
    return float(got is not None and math.isclose(got, ref, rel_tol=rel_tol, abs_tol=abs_tol))


def boxed(completion: str, record: dict[str, Any], **kw: Any) -> float:
    """numeric(), but only a completion that puts its answer in \\boxed{} can score."""
    return numeric(completion, record, **kw) if last_boxed(completion) is not None else 0.0


CHOICE = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")


def choice(completion: str, record: dict[str, Any], *, key: str = "answer", labels: str = "ABCDEFGH",
           **_: Any) -> float:
    """Multiple choice: 1 when the last standalone option letter of the answer part is the record's label."""
    ref = normalize_text(_reference(record, key)).upper()[:1]
    part = extract_answer(completion)
    found = [c for c in CHOICE.findall(unicodedata.normalize("NFKC", part).upper()) if c in labels]
    return float(bool(found) and found[-1] == ref)


def regex(completion: str, record: dict[str, Any], *, pattern: str, full: bool = False, **_: Any) -> float:
    """1 when the pattern matches (re.search; full=True: the whole completion, DOTALL)."""
    rx = re.compile(pattern, re.DOTALL)
    return float(bool(rx.fullmatch(completion.strip()) if full else rx.search(completion)))


def _json_candidate(text: str) -> Any:
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    for cand in [*reversed(fenced), after_think(text).strip()]:
        try:
            return json.loads(cand)
        except ValueError:
            pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start:end + 1])
        except ValueError:
            pass
    raise ValueError("no JSON value")


def json_schema(completion: str, record: dict[str, Any], *, schema: dict | None = None, **_: Any) -> float:
    """1 when the completion holds a JSON value valid against `schema` (or the record's meta.schema), else 0."""
    import jsonschema

    schema = schema if schema is not None else (record.get("meta") or {}).get("schema")
    if schema is None:
        raise ValueError("json_schema needs args.schema or a 'schema' field in the record")
    try:
        value = _json_candidate(completion)
    except ValueError:
        return 0.0
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return 0.0
    return 1.0


THINK = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>\s*(?P<answer>\S.*)$", re.DOTALL)


def think_format(completion: str, record: dict[str, Any], **_: Any) -> float:
    """R1 format: reasoning closed by exactly one `</think>` (the opening `<think>` may sit in the prompt, as in
    the R1 template), no second `<think>`, then a non-empty answer."""
    m = THINK.match(completion)
    if not m or completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return 0.0
    return float(bool(m.group("think").strip()))


def length(completion: str, record: dict[str, Any], *, target: int = 200, tolerance: float | None = None,
           **_: Any) -> float:
    """1 − |chars − target| / (tolerance or target), clipped to [0, 1]: answers near `target` characters."""
    scale = tolerance or target
    return max(0.0, 1.0 - abs(len(completion.strip()) - target) / max(1, scale))


BUILTIN: dict[str, RewardFn] = {"exact": exact, "numeric": numeric, "boxed": boxed, "choice": choice,
                                "regex": regex, "json_schema": json_schema, "think_format": think_format,
                                "length": length}


# ---------------------------------------------------------------- loading and scoring
@dataclass(frozen=True)
class Reward:
    """A loaded reward: its config name, weight, keyword arguments and function."""

    name: str
    weight: float
    args: dict[str, Any]
    fn: RewardFn


def entry_point(name: str, where: str = "grpo.rewards") -> RewardFn:
    """`module:function` → the callable; one-line ConfigError when it cannot be imported."""
    mod_name, _, attr = name.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"{where}: {name!r}: expected a built-in ({', '.join(BUILTIN)}) or module:function")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:  # ImportError, or the module raising on import
        raise ConfigError(f"{where}: {name!r}: cannot import {mod_name} ({type(err).__name__}: {err})") from err
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {name!r}: {mod_name} has no function {attr}")
    return fn


def load_rewards(specs: Sequence[Any], where: str = "grpo.rewards") -> list[Reward]:
    """Config specs (objects or dicts with name, weight, args) → loaded rewards; regex patterns are checked here."""
    out = []
    if not specs:
        raise ConfigError(f"{where}: no reward function configured")
    for i, spec in enumerate(specs):
        get = spec.get if isinstance(spec, dict) else lambda k, d=None, s=spec: getattr(s, k, d)
        name, args = get("name"), dict(get("args") or {})
        fn = BUILTIN.get(name) or entry_point(name, f"{where}[{i}]")
        if name == "regex":
            try:
                re.compile(args.get("pattern", ""))
            except re.error as err:
                raise ConfigError(f"{where}[{i}].args.pattern: not a regular expression ({err})") from err
            if "pattern" not in args:
                raise ConfigError(f"{where}[{i}]: regex needs args.pattern")
        out.append(Reward(name=name, weight=float(get("weight", 1.0)), args=args, fn=fn))
    return out


def score(rewards: Sequence[Reward], completion: str, record: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(Σ weight × value, {name: value}) of one completion; RewardError when a function raises or returns a
    value that is not a finite number."""
    parts: dict[str, float] = {}
    total = 0.0
    for rw in rewards:
        try:
            value = rw.fn(completion, record, **rw.args)
        except Exception as err:
            raise RewardError(f"reward function {rw.name} raised {type(err).__name__}: {str(err)[:200]} on record "
                              f"{record.get('id')!r} — fix the function (or the record's answer/meta fields); "
                              f"training stopped") from err
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardError(f"reward function {rw.name} returned {value!r} on record {record.get('id')!r}; "
                              f"rewards must be finite numbers")
        parts[rw.name] = parts.get(rw.name, 0.0) + value
        total += rw.weight * value
    return total, parts
