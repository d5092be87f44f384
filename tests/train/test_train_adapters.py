"""LoRA attach/load: B = 0 (merged equals base before training), exact DeepSeek targets incl. experts."""

from __future__ import annotations

import torch

from dsft.config import LoraConfig
from dsft.model.adapters import adapted_module_names, attach_lora, load_adapter, merge_adapter
from dsft.model.load import load_model, resolve_model_dir


def _tiny():
    return load_model(resolve_model_dir("embedded:tiny-deepseek-v3"), dtype="float32")


def test_merged_equals_base_before_training():
    torch.manual_seed(0)
    x = torch.randint(5, 7000, (2, 24))
    base = _tiny().eval()
    with torch.no_grad():
        ref = base(x, use_cache=False).logits
    pm, _ = attach_lora(_tiny(), LoraConfig(r=8, dropout=0.1))
    pm.eval()
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in pm.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(pm(x, use_cache=False).logits, ref)
        merged = merge_adapter(pm)
        assert torch.equal(merged(x, use_cache=False).logits, ref)


def test_saved_adapter_reloads_onto_the_same_modules(tmp_path):
    pm, _ = attach_lora(_tiny(), LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval()
    x = torch.randint(5, 7000, (1, 16))
    with torch.no_grad():
        ref = pm(x, use_cache=False).logits
    pm.save_pretrained(str(tmp_path / "ad"))
    re = load_adapter(_tiny(), tmp_path / "ad").eval()
    assert adapted_module_names(re) == adapted_module_names(pm)
    with torch.no_grad():
        assert torch.equal(re(x, use_cache=False).logits, ref)
