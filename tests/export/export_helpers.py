"""Helpers of the export tests: a LoRA adapter with nonzero B, a run directory with data/train manifests."""

from __future__ import annotations

import json
from pathlib import Path

from dsft.run import RunDir, write_jsonl


def make_lora_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, use_dora: bool = False,
                      experts: bool = False) -> Path:
    """A real PEFT LoRA on the MLA projections (and optionally the fused experts) with random, nonzero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    kwargs = {}
    if experts:
        kwargs["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora, init_lora_weights=False,
                     target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], **kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the adapter's effect clearly visible in the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def make_run(root: Path, base_dir: Path, adapter_dir: Path | None, *, model_dir: Path | None = None) -> RunDir:
    """A RunDir with a data manifest (2 held-out records) and a train manifest pointing at base + adapter."""
    import shutil

    run = RunDir(root)
    d = run.stage_dir("data")
    recs = [
        {"id": "t:2", "label": "消化科", "fields": {"question": "胃痛怎么办？", "answer": "少食多餐，必要时就医。"},
         "messages": [{"role": "user", "content": "胃痛怎么办？"}, {"role": "assistant", "content": "少食多餐，必要时就医。"}]},
        {"id": "t:3", "label": "神经科", "fields": {"question": "失眠怎么调理？", "answer": "规律作息，睡前少看手机。"},
         "messages": [{"role": "user", "content": "失眠怎么调理？"}, {"role": "assistant", "content": "规律作息，睡前少看手机。"}]},
    ]
    write_jsonl(d / "test.jsonl", recs)
    run.write_manifest("data", {"train": "test.jsonl", "test": "test.jsonl", "eval": None, "labels": ["消化科", "神经科"],
                                "label_field": "domain"})
    t = run.stage_dir("train")
    manifest = {"base_model": str(base_dir), "method": "lora", "adapter": None, "model": None}
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, t / "adapter")
        manifest["adapter"] = "adapter"
    if model_dir is not None:
        shutil.copytree(model_dir, t / "model")
        manifest.update(method="full", model="model")
    run.write_manifest("train", manifest)
    return run


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text(encoding="utf-8"))
