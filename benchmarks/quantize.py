"""Quantization benchmark: every export variant vs fp32 PyTorch (the peer), demo model and a ≈150 M model.

Usage: python benchmarks/quantize.py [--samples 8] [--new-tokens 16] [--threads 1] [--clock cpu|wall] [--skip-large] [--no-gguf] [--half]

Speeds are timed by this process's CPU time at 1 thread by default: on a shared machine (here 2 cores, 7 busy
processes) wall time swings several-fold between variants measured a minute apart; CPU time does not. Use
`--clock wall --threads N` on an idle machine.

For each model it runs the real export (merged fp32 [+ fp16 + bf16 with --half] + int8 + int4 [+ GGUF f16/q8_0/Q4_K_M
when the `gguf` extra is installed]) and the eval stage's quantization report on held-out medical QA records (the packaged GB18030 subset), then prints
the report table. Both models are random-init DeepSeek-V3 shapes (MLA + MoE) with the demo tokenizer: the "demo"
one is the embedded default (≈ 3 M parameters), the "large" one ≈ 150 M parameters (hidden 1024, 8 layers,
8 routed experts top-2 + 1 shared). The last line is JSON with the large model's int8 numbers:
int8_size_ratio (weights bytes / fp32), int8_decode_speedup, int8_prefill_speedup, int8_quality_delta
(perplexity change in %), int8_greedy_match, plus the same for int4 and GGUF and the demo model's under "demo".
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LARGE = dict(
    hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=128,
)


def records(n: int) -> tuple[list[dict], list[str]]:
    """Held-out style records (last rows of the packaged medical QA subset, real text) and the department labels."""
    from dsft.model.paths import assets_dir
    from dsft.records import qa_messages

    raw = (assets_dir() / "data" / "medical_qa_subset.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(raw)))
    out = []
    for r in rows[-n:]:
        fields = {"question": r["title"], "context": r["ask"], "answer": r["answer"][:200]}
        out.append({"messages": qa_messages(fields), "fields": fields, "label": r["department"]})
    return out, sorted({r["department"] for r in rows})


def run_model(label: str, overrides: dict, work: Path, formats: list[str], args) -> dict:
    from dsft.config import config_from_dict
    from dsft.eval.variants import measure_export
    from dsft.export.stage import export_model
    from dsft.model.tiny import build_tiny_deepseek_v3
    from dsft.run import atomic_write_json

    t0 = time.perf_counter()
    base = build_tiny_deepseek_v3(work / f"{label}-base", seed=0, **overrides)
    cfg = config_from_dict({"export": {"formats": formats, "report": True, "report_samples": args.samples,
                                       "report_new_tokens": args.new_tokens, "report_threads": args.threads,
                                       "report_clock": args.clock}})
    recs, labels = records(args.samples)
    out = work / f"{label}-out"
    m = export_model(base, out, cfg, conversations=[r["messages"] for r in recs[:8]], force=True)
    atomic_write_json(out / "manifest.json", {"stage": "export", **m})
    rep = measure_export(cfg, out, records=recs, labels=labels)  # the eval stage's quantization report
    params = m["params"]
    print(f"\n## {label} model: {params / 1e6:.1f} M parameters (export + report {time.perf_counter() - t0:.0f} s)\n")
    print((out / "quant_report.md").read_text(encoding="utf-8"))
    return {"params": params, "rows": {r["variant"]: r for r in rep["rows"]}}


def summary(res: dict) -> dict:
    out = {"params_m": round(res["params"] / 1e6, 1)}
    for name, r in res["rows"].items():
        if name == "merged":
            out["fp32_decode_tok_s"] = round(r["decode_tok_s"], 2)
            out["fp32_prefill_tok_s"] = round(r["prefill_tok_s"], 1)
            continue
        key = name.replace("-", "_")
        out[f"{key}_size_ratio"] = round(r["size_ratio"], 3)
        out[f"{key}_decode_speedup"] = round(r["decode_speedup"], 2)
        out[f"{key}_prefill_speedup"] = round(r["prefill_speedup"], 2)
        out[f"{key}_quality_delta"] = round(r["perplexity_delta_pct"], 3)
        out[f"{key}_accuracy_delta"] = None if r["accuracy_delta"] is None else round(r["accuracy_delta"], 3)
        out[f"{key}_greedy_match"] = round(r["greedy_match"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for the speed columns (default 1)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="time speeds by process CPU time or wall time")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--half", action="store_true", help="also fp16 and bf16 copies of the merged model (slow on CPUs "
                                                          "without native half-precision matmuls)")
    ap.add_argument("--work", help="keep the models and exports here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from dsft.export.gguf import gguf_unavailable_reason

    formats = ["merged", "fp16", "bf16", "int8", "int4"] if args.half else ["merged", "int8", "int4"]
    why = gguf_unavailable_reason()
    if not args.no_gguf and why is None:
        formats += ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    elif not args.no_gguf:
        print(f"(GGUF rows skipped: {why})")
    print(f"# dsft quantization benchmark — peer: fp32 PyTorch; {args.threads} threads, {args.clock} clock, "
          f"{args.samples} records, {args.new_tokens} new tokens")
    with tempfile.TemporaryDirectory(prefix="dsft-qbench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        demo = run_model("demo", {}, work, formats, args)
        large = None if args.skip_large else run_model("large", LARGE, work, formats, args)
    final = summary(large) if large else summary(demo)
    final["model"] = "large" if large else "demo"
    final["demo"] = summary(demo)
    final["threads"] = args.threads
    final["clock"] = args.clock
    final["goal"] = {"int8_size_ratio_max": 0.3, "int8_decode_speedup_min": 1.5}
    head = final
    print(f"\nint8 vs fp32 ({final['model']}): size {head['int8_size_ratio']:.2f}×, decode {head['int8_decode_speedup']:.2f}×, "
          f"prefill {head['int8_prefill_speedup']:.2f}×, perplexity {head['int8_quality_delta']:+.2f} %")
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
