"""dsft → vLLM flag mapping that depends on the machine and the model folder (runs without vLLM)."""

from __future__ import annotations

import json
import logging

from dsft.config import ServeConfig
from dsft.model.vllm_args import vllm_args


def _model(tmp_path, *, think_tokens: bool, template_file: bool):
    m = tmp_path / "m"
    m.mkdir()
    added = [{"id": 0, "content": "<｜begin▁of▁sentence｜>"}]
    if think_tokens:
        added += [{"id": 1, "content": "<think>"}, {"id": 2, "content": "</think>"}]
    (m / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"vocab": {"a": 3}}}))
    tpl = "{{ '<｜Assistant｜><think>\\n' }}"
    if template_file:  # transformers ≥ 4.45 writes the template beside tokenizer_config.json
        (m / "chat_template.jinja").write_text(tpl)
        (m / "tokenizer_config.json").write_text("{}")
    else:
        (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl}))
    return m


def test_cpu_sizes_the_kv_cache_in_bytes_not_as_a_share_of_ram(tmp_path):
    cfg = ServeConfig(port=9000)
    cpu = vllm_args("/data/m", cfg, device="cpu", env={})
    assert cpu[cpu.index("--kv-cache-memory-bytes") + 1] == "4G" and "--gpu-memory-utilization" not in cpu
    assert "--kv-cache-memory-bytes" not in vllm_args("/data/m", cfg, device="cpu", env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    gpu = vllm_args("/data/m", cfg, device="cuda", env={})
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.9" and "--kv-cache-memory-bytes" not in gpu


def test_r1_template_in_chat_template_jinja_turns_the_reasoning_parser_on(tmp_path):
    args = vllm_args(str(_model(tmp_path, think_tokens=True, template_file=True)), ServeConfig(port=9000))
    assert args[args.index("--reasoning-parser") + 1] == "deepseek_r1"


def test_r1_template_in_tokenizer_config(tmp_path):
    args = vllm_args(str(_model(tmp_path, think_tokens=True, template_file=False)), ServeConfig(port=9000))
    assert "--reasoning-parser" in args


def test_no_reasoning_parser_without_think_tokens_and_it_says_why(tmp_path, caplog):
    m = _model(tmp_path, think_tokens=False, template_file=True)
    with caplog.at_level(logging.WARNING, logger="dsft.serve"):
        args = vllm_args(str(m), ServeConfig(port=9000, chat_template="r1-distill"))
    assert "--reasoning-parser" not in args  # vLLM's deepseek_r1 parser refuses to start without them
    assert "no <think>/</think> tokens" in caplog.text


def test_lora_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path):
    from dsft.model.adapters import lora_rank
    from dsft.model.vllm_args import vllm_max_lora_rank

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 12}')
    assert lora_rank(tmp_path / "a") == 12 and lora_rank(tmp_path / "missing") is None
    assert [vllm_max_lora_rank(r) for r in (1, 2, 12, 16, 300, 1024)] == [1, 8, 16, 16, 320, 1024]
    args = vllm_args("m", ServeConfig(lora_modules={"x": str(tmp_path / "a")}))
    assert args[args.index("--max-lora-rank") + 1] == "16"


def test_v31_thinking_template_name_turns_the_reasoning_parser_on(tmp_path):
    model = str(_model(tmp_path, think_tokens=True, template_file=False))
    on = vllm_args(model, ServeConfig(port=9000, chat_template="deepseek-v3.1-thinking"))
    assert on[on.index("--reasoning-parser") + 1] == "deepseek_r1"
    off = vllm_args(model, ServeConfig(port=9000, chat_template="deepseek-v3"))
    assert "--reasoning-parser" not in off
