"""Validated request bodies → prompt token ids and sampling parameters, with every length and id checked.

The functions that render templates, tokenize or detokenize (`chat_prompt`, `completion_prompt`, `decode`) run
in a worker thread, never on the event loop (`await run_off_loop(chat_prompt, …)`): a large prompt must not stall
/health or other clients. A prompt too long to fit in any case is refused by its character count before any of
that work (see `dsft.serve.engine.max_token_chars`). Every problem is an `ApiError` 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from dsft.serve.engine import Engine, SamplingParams, encode
from dsft.serve.errors import ApiError

T = TypeVar("T")


async def run_off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn in the server's worker threads (the event loop keeps answering meanwhile)."""
    return await run_in_threadpool(fn, *args, **kwargs)


def _too_long(ctx: int, what: str, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has {what}. "
                         f"Please reduce the length of the prompt.", param=param)


def check_chars(eng: Engine, chars: int, param: str) -> None:
    """Refuse a prompt whose characters alone cannot fit in the context (before tokenizing it)."""
    if eng.max_prompt_chars and chars > eng.max_prompt_chars:
        raise _too_long(eng.max_model_len, f"{chars} characters, more than {eng.max_model_len} tokens can hold",
                        param)


def chat_prompt_ids(tok: Any, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """(rendered text, token ids) of the prompt the default engine gives a conversation (what `dsft doctor` checks)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, encode(tok, text, add_special_tokens=False)


def chat_prompt(eng: Engine, messages: list[dict[str, Any]], *, param: str = "messages") -> tuple[str, list[int]]:
    """(rendered text, token ids) of a conversation; a conversation the template rejects is the client's mistake."""
    check_chars(eng, sum(len(m.get("content") or "") for m in messages), param)
    try:
        return chat_prompt_ids(eng.tok, messages)
    except Exception as err:  # noqa: BLE001 - jinja raise_exception (role order, missing fields …)
        raise ApiError(400, f"{param}: the chat template rejected the conversation ({str(err)[:200]})",
                       param=param) from err


def completion_prompt(eng: Engine, prompt: str | list) -> list[int]:
    """Token ids of a /v1/completions prompt: a string, a one-string list, or token ids (each checked)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_chars(eng, len(prompt), "prompt")
        ids = eng.encode(prompt, add_special_tokens=True)
    else:
        vocab = len(eng.tok)
        bad = next((x for x in prompt if not 0 <= x < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is out of the vocabulary (0 ≤ id < {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty (it encodes to no tokens)", param="prompt")
    return ids


def decode(eng: Engine, ids: list[int]) -> str:
    return eng.tok.decode(ids)


def sampling_params(eng: Engine, n_prompt: int, max_tokens: int | None, *, temperature: float, top_p: float,
                    seed: int | None, stop: list[str], clamp: bool = False,
                    prompt_param: str = "messages") -> SamplingParams:
    """Sampling parameters whose prompt + completion fit in the context (clamp: shorten max_tokens to fit)."""
    ctx = eng.max_model_len
    if n_prompt >= ctx:
        raise _too_long(ctx, f"{n_prompt} tokens", prompt_param)
    room = ctx - n_prompt
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        if not clamp:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           param="max_tokens")
        max_tokens = room
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
