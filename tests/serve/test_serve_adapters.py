"""Several LoRA adapters over one base, chosen by `model`, batched together; outputs equal plain PEFT's."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
import torch
from serve_helpers import assert_greedy_matches, greedy_reference

from dsft.config import ServeConfig
from dsft.serve import serve_in_background

PROMPTS = ["头痛怎么办", "发烧三天了"]


def _make_adapter(base_dir, out_dir, seed, modules_to_save=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_a_proj", "kv_a_proj_with_mqa", "o_proj"],
                     init_lora_weights=False, modules_to_save=modules_to_save)  # random A and B: outputs change
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
            if "modules_to_save" in n:  # a trained final norm (as `dsft train` saves with modules_to_save)
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"med-a": _make_adapter(tiny_model_dir, root / "a", 1), "med-b": _make_adapter(tiny_model_dir, root / "b", 2),
            "med-norm": _make_adapter(tiny_model_dir, root / "c", 3, modules_to_save=["model.norm"])}


def test_adapters_listed_and_selected_by_model(tiny_model_dir, adapters):
    cfg = ServeConfig(port=0, served_model_name="base",
                      lora_modules={k: str(v) for k, v in adapters.items() if k != "med-norm"})
    with serve_in_background(str(tiny_model_dir), cfg) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        assert "dsft_mixed_adapter_batching 1.0" in httpx.get(f"{url}/metrics").text
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "med-a", "med-b"}
        assert models["med-a"].parent == "base" and models["med-b"].parent == "base" and models["base"].parent is None

        def ask(name_prompt):
            name, prompt = name_prompt
            return client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=10, temperature=0).choices[0].message.content

        jobs = [(m, p) for m in ("base", "med-a", "med-b") for p in PROMPTS]
        with cf.ThreadPoolExecutor(6) as ex:  # mixed adapters in one batch
            got = dict(zip(jobs, ex.map(ask, jobs), strict=True))
    for p in PROMPTS:
        assert len({got[("base", p)], got[("med-a", p)], got[("med-b", p)]}) == 3
    for name, adir in (("base", None), ("med-a", adapters["med-a"]), ("med-b", adapters["med-b"])):
        for p in PROMPTS:  # each row of the mixed batch ran its own adapter
            assert_greedy_matches(got[(name, p)], greedy_reference(tiny_model_dir, p, 10, adir))


def test_missing_adapter_folder_fails_at_start(tiny_model_dir, tmp_path):
    from dsft.errors import DsftError

    cfg = ServeConfig(port=0, lora_modules={"x": str(tmp_path / "missing")})
    with pytest.raises(DsftError, match="adapter_config.json"):
        with serve_in_background(str(tiny_model_dir), cfg):
            pass


def test_adapter_folder_given_as_model_explains_lora_flag(adapters):
    from dsft.errors import DsftError

    with pytest.raises(DsftError, match="--lora NAME=") as e:
        with serve_in_background(str(adapters["med-a"]), ServeConfig(port=0)):
            pass
    assert "\n" not in str(e.value)


def test_adapters_that_cannot_share_a_pass_are_batched_per_adapter(tiny_model_dir, adapters):
    # PEFT cannot mix an adapter with a saved RMSNorm (modules_to_save) into one forward pass with others:
    # the engine then batches each adapter separately; answers must still be exactly the plain PEFT ones.
    cfg = ServeConfig(port=0, served_model_name="base",
                      lora_modules={"med-a": str(adapters["med-a"]), "med-norm": str(adapters["med-norm"])})
    with serve_in_background(str(tiny_model_dir), cfg) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        def ask(name_prompt):
            name, prompt = name_prompt
            return client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=10, temperature=0).choices[0].message.content

        assert "dsft_mixed_adapter_batching 0.0" in httpx.get(f"{url}/metrics").text
        jobs = [(m, p) for p in PROMPTS for m in ("base", "med-norm", "med-a")] * 2
        with cf.ThreadPoolExecutor(6) as ex:
            got = list(ex.map(ask, jobs))
    answers = dict(zip(jobs, got, strict=True))
    for name, adir in (("base", None), ("med-norm", adapters["med-norm"]), ("med-a", adapters["med-a"])):
        for p in PROMPTS:
            assert_greedy_matches(answers[(name, p)], greedy_reference(tiny_model_dir, p, 10, adir))
