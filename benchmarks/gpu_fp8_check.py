"""GPU check of the FP8 base path (one CUDA GPU, ≤ 3 min): dsft's dequantize-on-the-fly FP8Linear against a BF16
matmul and, where this torch/GPU has it, torch._scaled_mm on e4m3 operands — correctness, forward+backward time.

Shapes are DeepSeek-V3's (hidden 7168: q_b_proj, o_proj, one routed expert's gate/down) at 4,096 tokens. Then the
tiny shipped-layout FP8 checkpoint (dsft.model.shipped) loads on the GPU, its logits are compared with the CPU FP32
load, and one bf16-autocast LoRA step runs. Usage (repository root, torch with CUDA):
    PYTHONPATH=src python benchmarks/gpu_fp8_check.py
Last line JSON. Not run on a GPU by its author: record the output with the date before quoting numbers.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch

from dsft.model import fp8
from dsft.model.fp8_linear import FP8Linear

SHAPES = {"q_b_proj": (1536, 24576), "o_proj": (16384, 7168), "expert.gate_proj": (7168, 2048),
          "expert.down_proj": (2048, 7168)}
TOKENS = 4096


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def _scaled_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """x · Wᵀ with e4m3 operands through torch._scaled_mm: activations per row, the weight re-scaled per output row
    (its 128×128 blocks folded into one scale per row — an approximation, reported as an error)."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    w = fp8.dequantize(q, s, dtype=torch.float32)
    w_scale = (w.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX).clamp(min=1e-12)
    wq = (w / w_scale).to(fp8.FP8_DTYPE)
    x_scale = (x.float().abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX).clamp(min=1e-12)
    xq = (x.float() / x_scale).to(fp8.FP8_DTYPE)
    try:
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError) as err:
        print(f"  torch._scaled_mm unavailable here: {str(err).splitlines()[0][:160]}")
        return None


def check_shape(name: str, d_in: int, d_out: int) -> dict:
    torch.manual_seed(0)
    q, s = fp8.quantize(torch.randn(d_out, d_in, device="cuda") * 0.02)
    lin = FP8Linear(d_in, d_out, device="cuda")
    lin.set_fp8(q, s)
    w_bf16 = fp8.dequantize(q, s, dtype=torch.bfloat16)
    x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.functional.linear(x, w_bf16)
    got = lin(x)
    err = fp8.relative_error(ref, got)[0]

    def fwd_bwd(f):
        return lambda: f(x).sum().backward()

    row = {"shape": name, "d_in": d_in, "d_out": d_out, "max_rel_err_vs_bf16": err,
           "bf16_ms": _time(fwd_bwd(lambda t: torch.nn.functional.linear(t, w_bf16))),
           "fp8_dequant_ms": _time(fwd_bwd(lin))}
    with torch.no_grad():
        sm = _scaled_mm(x.detach(), q, s)
        if sm is not None:
            row["scaled_mm_max_rel_err"] = fp8.relative_error(ref, sm)[0]
            row["scaled_mm_fwd_ms"] = _time(lambda: _scaled_mm(x.detach(), q, s))
            row["bf16_fwd_ms"] = _time(lambda: torch.nn.functional.linear(x.detach(), w_bf16))
    print(f"  {name:17s} {d_in}→{d_out}: bf16 {row['bf16_ms']:.2f} ms, FP8 dequant {row['fp8_dequant_ms']:.2f} ms "
          f"(fwd+bwd), max rel err {err:.2e}" + (f"; _scaled_mm fwd {row['scaled_mm_fwd_ms']:.2f} ms vs bf16 "
                                                f"{row['bf16_fwd_ms']:.2f} ms" if "scaled_mm_fwd_ms" in row else ""))
    return row


def check_tiny_model() -> dict:
    from dsft.config import LoraConfig
    from dsft.model.adapters import attach_lora
    from dsft.model.fp8_linear import fp8_resident_bytes
    from dsft.model.load import load_model
    from dsft.model.shipped import write_shipped

    with tempfile.TemporaryDirectory() as tmp:
        d = write_shipped(f"{tmp}/v3")
        ids = torch.randint(0, 128000, (2, 64))
        cpu = load_model(d, dtype="float32")
        with torch.no_grad():
            want = cpu(ids).logits
        gpu = load_model(d, dtype="float32").to("cuda")
        held, params = fp8_resident_bytes(gpu)
        with torch.no_grad():
            got = gpu(ids.cuda()).logits.cpu()
        pm, _ = attach_lora(gpu, LoraConfig(r=8, dropout=0.0))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pm(ids.cuda(), labels=ids.cuda()).loss
        loss.backward()
        opt.step()
    out = {"logits_max_abs_diff_gpu_vs_cpu": float((got - want).abs().max()), "bytes_per_fp8_param": held / params,
           "lora_step_loss": float(loss), "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    print(f"  tiny shipped FP8 V3 on GPU: logits max |Δ| vs CPU fp32 {out['logits_max_abs_diff_gpu_vs_cpu']:.2e}, "
          f"{out['bytes_per_fp8_param']:.4f} bytes/FP8 param, bf16 LoRA step loss {out['lora_step_loss']:.3f}")
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        print(json.dumps({"cuda": False}))
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [check_shape(n, *dims) for n, dims in SHAPES.items()]
    tiny = check_tiny_model()
    print(json.dumps({"cuda": True, "device": torch.cuda.get_device_name(), "tokens": TOKENS, "shapes": rows,
                      "tiny_model": tiny}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
