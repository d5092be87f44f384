"""The template parity check of one model folder over every path dsft renders chats on.

Paths: train (the train stage's encoder), serve (the default engine's prompt), vllm (the template dsft hands vLLM,
rendered through the tokenizer's apply_chat_template and tokenized without special tokens, as vLLM does) and
modelfile (the Ollama Modelfile export writes, rendered by Go's text/template with the data Ollama passes, BOS added
when the GGUF's tokenizer adds it; n/a without a Go toolchain). The doctor is a top-level command, not a stage: it
may use each stage's public module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.errors import ModelError
from dsft.model.parity import TRAIN, ParityTable, PathFn, check_parity


def serve_path(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    from dsft.serve.prompts import chat_prompt_ids

    return chat_prompt_ids(tok, messages)[1]


def vllm_path(model_dir: Path, chat_template: str | None) -> PathFn:
    from dsft.model.vllm_args import vllm_chat_template

    template = vllm_chat_template(str(model_dir), chat_template)

    def ids(tok: Any, messages: list[dict[str, Any]]) -> list[int] | None:
        if template is None:
            return None
        text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    return ids


def modelfile_renders(tok: Any, model_dir: Path, conversations: dict[str, list[dict[str, Any]]]) -> dict:
    """Every prompt's Modelfile rendering at once (one Go process), keyed by (conversation, message count)."""
    from dsft.export.gguf import modelfile
    from dsft.model.ollama import drops_history_think, gguf_adds_bos, ollama_messages, render_go

    adds_bos = gguf_adds_bos(model_dir)
    text = modelfile("model.gguf", tok.chat_template, runtime_adds_bos=adds_bos)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    drop = drops_history_think(tok.chat_template) if "<｜User｜>" in (tok.chat_template or "") else False
    keys, jobs = [], []
    for name, conv in conversations.items():
        for i, m in enumerate(conv):
            if m.get("role") == "assistant":
                keys.append((name, i))
                jobs.append((template, ollama_messages(conv[:i], drop_think=drop)))
    rendered = render_go(jobs)
    if rendered is None:
        return {}
    bos = [tok.bos_token_id] if adds_bos and tok.bos_token_id is not None else []
    return {k: bos + list(tok(r, add_special_tokens=False)["input_ids"]) for k, r in zip(keys, rendered, strict=True)}


def doctor(model_dir: str | Path, *, chat_template: str | None = None,
           conversations: dict[str, list[dict[str, Any]]] | None = None) -> ParityTable:
    """Load the folder's tokenizer and chat template; check train, serve, vLLM and Modelfile against it."""
    from dsft.model.parity import CONVERSATIONS
    from dsft.model.tokenizer import load_tokenizer
    from dsft.train.encode import parity_row

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a model folder (expected a directory with tokenizer files)")
    tok = load_tokenizer(str(folder), chat_template=chat_template)
    if not tok.chat_template:
        raise ModelError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json); "
                         f"pass --chat-template NAME")
    convs = conversations or CONVERSATIONS
    renders = modelfile_renders(tok, folder, convs)

    def modelfile_path(tok: Any, messages: list[dict[str, Any]]) -> list[int] | None:
        name = next((n for n, c in convs.items() if c[: len(messages)] == messages), None)
        return renders.get((name, len(messages)))

    paths: dict[str, PathFn] = {TRAIN: parity_row, "serve": serve_path, "vllm": vllm_path(folder, chat_template),
                                "modelfile": modelfile_path}
    return check_parity(tok, paths, template=chat_template or folder.name, conversations=convs)
