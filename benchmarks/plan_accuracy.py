"""Planner accuracy: estimated vs measured peak memory of real training steps, side by side; last line JSON.

CPU (always): the validation matrix of small Llama / Qwen2 / DeepSeek-V3 (MLA + MoE) models, measured from
torch's CPU-allocator events in a fresh process, then 7B-width layers in bf16 (the GPU shapes, 2 layers). GPU (when CUDA is present): 7B-shape random-init models in
bf16, measured with torch.cuda.max_memory_allocated, each in its own fresh process (≈ 5 minutes on an H200).

  python benchmarks/plan_accuracy.py            # CPU matrix (+ GPU shapes when a GPU is visible)
  python benchmarks/plan_accuracy.py --gpu-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsft.train.measure import Spec, compare, measure_in_subprocess, validation_specs  # noqa: E402

MiB = 1024**2

# 7B-class shapes from the built-in configs (random init; only shapes matter for memory)
LLM_7B = dict(model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
              num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
QWEN_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
V2_LITE_AS_V3 = dict(model_type="deepseek_v3", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                     moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                     n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                     q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                     n_group=1, topk_group=1, tie_word_embeddings=False)


def gpu_specs() -> list[Spec]:
    g = dict(device="cuda", dtype="bfloat16", lora_rank=32)
    return [
        Spec("llama", "lora", 512, 4, shape=LLM_7B, **g),
        Spec("llama", "lora", 1024, 8, gc=True, shape=LLM_7B, **g),
        Spec("llama", "full", 512, 2, shape=LLM_7B, **g),
        Spec("llama", "freeze", 1024, 4, shape=LLM_7B, **g),
        Spec("qwen2", "lora", 512, 4, shape=QWEN_7B, **g),
        Spec("deepseek_v3", "lora", 512, 2, shape=V2_LITE_AS_V3, lora_targets="attention", **g),
    ]


def wide_specs() -> list[Spec]:
    """7B-width layers (1–2 of them, 8 k vocabulary) in bf16 under autocast on CPU: the GPU shapes' per-layer
    tensors at a size a CPU can run."""
    def small(d: dict, **k) -> dict:
        return {**d, "num_hidden_layers": 2, "vocab_size": 8192, **k}

    b = dict(dtype="bfloat16", lora_rank=32)
    return [
        Spec("llama", "lora", 128, 2, shape=small(LLM_7B), **b),
        Spec("qwen2", "lora", 128, 2, gc=True, shape=small(QWEN_7B), **b),
        Spec("deepseek_v3", "lora", 128, 1, shape=small(V2_LITE_AS_V3), lora_targets="attention", **b),
        Spec("llama", "full", 64, 1, shape=small(LLM_7B, num_hidden_layers=1), dtype="bfloat16"),
    ]


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'config':<44} {'estimated MiB':>14} {'measured MiB':>13} {'est/meas':>9} {'error %':>8}  peak at")
    for r in rows:
        print(f"{r['config']:<44} {r['estimated'] / MiB:14.1f} {r['measured'] / MiB:13.1f} "
              f"{r['estimated'] / r['measured']:9.3f} {r['error_pct']:+8.1f}  {r['phase']}")


def _summary(rows: list[dict]) -> dict:
    errs = [abs(r["error_pct"]) for r in rows]
    return {"n": len(rows), "max_abs_error_pct": round(max(errs), 2) if errs else None,
            "mean_abs_error_pct": round(sum(errs) / len(errs), 2) if errs else None,
            "within_10pct": sum(e <= 10 for e in errs),
            "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}


def run(specs: list[Spec], fresh_each: bool) -> list[dict]:
    rows = []
    groups = [[s] for s in specs] if fresh_each else [specs]
    for group in groups:
        try:
            results = measure_in_subprocess(group, timeout=480)
        except Exception as err:  # one failing GPU shape should not hide the others
            print(f"measurement failed for {[s.label for s in group]}: {err}", file=sys.stderr)
            continue
        rows += [compare(s, res["measured"]) for s, res in zip(group, results, strict=True)]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--no-wide", action="store_true", help="skip the 7B-width bf16 CPU rows (≈ 1 minute)")
    args = ap.parse_args(argv)
    out: dict = {"benchmark": "plan_accuracy", "peer": "measured peak (torch allocator)"}
    t0 = time.time()
    if not args.gpu_only:
        cpu_rows = run(validation_specs(), fresh_each=False)
        _table("CPU: estimate vs measured peak of 2 training steps (allocator events, fresh process)", cpu_rows)
        out["cpu"] = _summary(cpu_rows)
        if not args.no_wide:
            wide_rows = run(wide_specs(), fresh_each=False)
            _table("CPU, 7B-width layers in bf16 (autocast), 2 layers, 8 k vocabulary", wide_rows)
            out["cpu_wide"] = _summary(wide_rows)
    gpu_rows: list[dict] = []
    if not args.cpu_only:
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover
            has_cuda = False
        if has_cuda:
            gpu_rows = run(gpu_specs(), fresh_each=True)
            _table(f"GPU ({torch.cuda.get_device_name(0)}): estimate vs torch.cuda.max_memory_allocated, 7B shapes, bf16",
                   gpu_rows)
            out["gpu"] = _summary(gpu_rows)
        else:
            print("\nGPU: no CUDA device here; the 7B-shape comparison runs only on a GPU")
            out["gpu"] = None
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
