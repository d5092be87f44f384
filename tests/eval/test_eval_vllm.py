"""eval's vLLM generation backend for real (vLLM's CPU build here): greedy texts equal the transformers predictor's
in fp32 for the same prompts, with a LoRA adapter and on DeepSeek-V3 (MLA + MoE).

Skipped where vLLM is not importable (the main `make test` venv); `make test-vllm` runs it.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this venv (`make test-vllm` builds one with vLLM's CPU build)",
                allow_module_level=True)

PROMPTS = [[{"role": "user", "content": p}] for p in
           ["头痛怎么办", "发烧三天了，应该吃什么药？", "hi", "胃疼，恶心，呕吐，已经两天了"]]
NEAR_TIE = 1e-3


@pytest.fixture(autouse=True)
def _modest_cpu(monkeypatch, tmp_path):
    # inherited by vLLM's engine process: one OpenMP thread, no core pinning, a 1 GiB KV cache
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def _tiny_llama(out, adapter_out=None):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(str(out))
        tok.save_pretrained(str(out))
        if adapter_out is not None:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(1)
            get_peft_model(LlamaForCausalLM.from_pretrained(str(out)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
                                      init_lora_weights=False)).save_pretrained(str(adapter_out))
    return out


def _transformers(model_dir, adapter_dir, settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.eval.predict import generate

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model, tok, generate(model, tok, PROMPTS, settings)


def _assert_same_or_near_tie(model, tok, got: str, want: str, prompt) -> None:
    """Equal texts, or the first differing token is one where transformers' top-2 logits nearly tie."""
    if got == want:
        return
    import torch

    from dsft.eval.predict import prompt_text

    ids = tok(prompt_text(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    toks = out.sequences[0, ids.shape[1]:].tolist()
    k = next((i for i in range(len(toks))
              if not got.startswith(tok.decode(toks[: i + 1], skip_special_tokens=True).strip().rstrip("\ufffd"))),
             len(toks) - 1)
    top = out.scores[k][0].topk(2).values
    assert float(top[0] - top[1]) < NEAR_TIE, f"vLLM departs from transformers at token {k}: {got!r} != {want!r}"


def test_vllm_backend_is_usable_on_this_machine():
    from dsft.eval.vllm_backend import use_vllm, vllm_available, vllm_device

    assert vllm_available() and vllm_device() in ("cpu", "cuda")
    assert use_vllm("vllm") and use_vllm("auto") and not use_vllm("transformers")


@pytest.mark.parametrize("kind", ["llama+lora", "deepseek_v3"])
def test_generate_vllm_matches_the_transformers_predictor(tmp_path, kind):
    import psutil

    from dsft.eval.predict import GenerationSettings
    from dsft.eval.vllm_backend import generate_vllm

    adapter = None
    if kind == "deepseek_v3":
        from dsft.model.tiny import VLLM_CPU_MLA, build_tiny_deepseek_v3

        model_dir = build_tiny_deepseek_v3(tmp_path / "ds3", seed=0, **VLLM_CPU_MLA)
    else:
        adapter = tmp_path / "adapter"
        model_dir = _tiny_llama(tmp_path / "llama", adapter)
    settings = GenerationSettings(max_new_tokens=16, batch_size=1)
    model, tok, ref = _transformers(model_dir, adapter, settings)
    got = generate_vllm(model_dir, tok, PROMPTS, settings, adapter_dir=adapter, dtype="float32", max_model_len=256)
    assert got["settings"]["backend"] == "vllm" and got["new_tokens"] > 0 and got["seconds"] > 0
    assert len(got["texts"]) == len(PROMPTS) and any(got["texts"])
    for g, w, p in zip(got["texts"], ref["texts"], PROMPTS, strict=True):
        _assert_same_or_near_tie(model, tok, g, w, p)
    # the engine process is stopped when generate_vllm returns (eval starts a second one for the fine-tuned model)
    left = [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != "zombie" and "resource_tracker" not in " ".join(c.cmdline())]
    assert not left, [" ".join(c.cmdline())[:120] for c in left]
