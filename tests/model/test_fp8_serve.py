"""Serving a shipped FP8 DeepSeek-V3 folder (+ a LoRA adapter trained on it) with the default engine over real HTTP."""

from __future__ import annotations

import httpx
import torch

from dsft.config import LoraConfig, ServeConfig
from dsft.model.adapters import attach_lora, load_adapter, save_adapter
from dsft.model.fp8_linear import has_fp8
from dsft.model.load import load_model
from dsft.model.shipped import write_shipped
from dsft.model.tokenizer import load_tokenizer
from dsft.serve import serve_in_background

PROMPT = "头痛怎么办"


def _greedy(model, tok, n: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).rstrip("\ufffd")  # as the server: no partial character


def test_generate_through_the_serve_route_on_the_fp8_base_with_an_adapter(tmp_path):
    base = write_shipped(tmp_path / "v3")
    torch.manual_seed(0)
    pm, _ = attach_lora(load_model(base, dtype="float32"), LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a visible adapter: its answer differs from the base's
    save_adapter(pm, tmp_path / "adapter")
    tok = load_tokenizer(str(base))
    fp8_base = load_model(base, dtype="float32")
    want_base = _greedy(fp8_base, tok, 8)
    ft = load_adapter(fp8_base, tmp_path / "adapter")
    assert has_fp8(ft)
    want_ft = _greedy(ft.eval(), tok, 8)
    assert want_ft != want_base
    cfg = ServeConfig(port=0, served_model_name="v3", lora_modules={"ft": str(tmp_path / "adapter")})
    with serve_in_background(str(base), cfg) as url:
        for model, want in (("v3", want_base), ("ft", want_ft)):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
        r = httpx.post(f"{url}/generate", timeout=120, json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["text"] == want_base
