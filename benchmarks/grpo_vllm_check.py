"""GPU check of GRPO rollouts on vLLM (grpo.rollout_backend: vllm): a few GRPO steps of a tiny Llama in fp32 on
CUDA with the colocated vLLM engine, then the weight-sync check (after syncing the trained policy, vLLM's greedy
answers equal transformers'). Self-checking: exits 1 with the reason when a check fails, 0 (with a skip line) when
vLLM or CUDA is missing. Usage: python benchmarks/grpo_vllm_check.py (≈ 2–3 minutes, mostly vLLM start-up);
GRPO_VLLM_CHECK_CPU=1 runs it on vLLM's CPU build (a dry run of the script itself).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _tiny_llama(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _run_dir(root: Path, n: int):
    from dsft.run import RunDir, write_jsonl

    recs = [{"id": f"toy:{k}", "prompt": [{"role": "user", "content": f"第{k}题：幸运数字是几？只回答一个数字。"}],
             "answer": "7"} for k in range(n)]
    for r in recs:
        r["messages"] = [*r["prompt"], {"role": "assistant", "content": "7"}]
    run = RunDir(root)
    write_jsonl(run.stage_dir("data") / "train.jsonl", recs)
    write_jsonl(run.stage_dir("data") / "eval.jsonl", [])
    run.write_manifest("data", {"train": "train.jsonl", "test": "eval.jsonl", "eval": "eval.jsonl",
                                "counts": {"train": n}})
    return run


def _greedy_equal(cfg, model_dir: Path, adapter: Path, device: str) -> bool:
    """Sync the trained policy (base + LoRA adapter, merged on the fly) into a fresh engine; its greedy answers must
    equal transformers' (on the GPU)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from dsft.model.load import load_model
    from dsft.train.objectives.vllm_rollout import VllmRollouts

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(load_model(model_dir, dtype="float32"), str(adapter)).to(device).eval()
    prompts = [tok(f"第{k}题：幸运数字是几？", add_special_tokens=False)["input_ids"] for k in range(4)]
    want = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        want.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    engine = VllmRollouts(cfg, model_dir, tok)
    try:
        engine.sync(model)
        got = [g[0].ids for g in engine.sample(prompts, 1, max_new_tokens=8, seeds=[0] * 4, temperature=0.0)]
    finally:
        engine.close()
    print(f"grpo_vllm_check: greedy after sync — vLLM {got} vs transformers {want}")
    return got == want


def main() -> int:
    import torch

    from dsft.config import config_from_dict
    from dsft.model.vllm_platform import vllm_device
    from dsft.train import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if vllm_device() != device or (device == "cpu" and not os.environ.get("GRPO_VLLM_CHECK_CPU")):
        print("grpo_vllm_check: skipped (needs CUDA and vLLM's CUDA build: pip install 'dsft[vllm]')")
        return 0
    root = Path(tempfile.mkdtemp(prefix="grpo-vllm-"))
    base = _tiny_llama(root / "llama")
    run = _run_dir(root, 16)
    cfg = config_from_dict({
        "run_dir": str(root), "model": {"name_or_path": str(base), "dtype": "float32"},
        "data": {"max_seq_length": 64},
        "train": {"objective": "grpo", "method": "lora", "max_steps": 4, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1000, "report_to": ["none"]},
        "grpo": {"num_generations": 4, "max_completion_length": 16, "rollout_backend": "vllm",
                 "vllm_gpu_memory_utilization": 0.2, "guard_warmup_steps": 100,
                 # random-init model: a length reward spreads the rewards, so the adapter moves off zero
                 "rewards": [{"name": "length", "args": {"target": 20}}]}})
    t0 = time.perf_counter()
    m = train(cfg, run)
    seconds = time.perf_counter() - t0
    log = [json.loads(x) for x in (root / "train" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "grpo/reward" in (r.get("objective") or {})]
    fails = []
    if len(steps) != 4:
        fails.append(f"{len(steps)} GRPO steps logged, expected 4")
    if not any(s["objective"]["grpo/reward_std"] > 0 for s in steps):
        fails.append("no reward spread: the adapter did not move, so the sync check below would be vacuous")
    if m.get("objective_config", {}).get("rollout_backend") != "vllm":
        fails.append("the manifest does not record rollout_backend vllm")
    if not _greedy_equal(cfg, base, root / "train" / "adapter", device):
        fails.append("vLLM's greedy answers after a sync differ from transformers'")
    print(json.dumps({"check": "grpo_vllm", "device": device, "steps": len(steps), "seconds": round(seconds, 1),
                      "reward": [s["objective"]["grpo/reward"] for s in steps], "fails": fails}))
    for f in fails:
        print(f"grpo_vllm_check: FAIL {f}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
