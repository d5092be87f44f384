"""Peak host memory of merging a LoRA into a sharded FP8 checkpoint: dsft's streaming merge vs a load-everything merge.

Writes a synthetic DeepSeek-V3-layout FP8 checkpoint (e4m3 + 128×128 weight_scale_inv, per-expert routed tensors,
an MTP layer, BF16 embeddings/head/norms) of ≥ 4 GB in ≥ 8 shards into a temporary folder (free disk checked
first, everything deleted afterwards), a PEFT-format LoRA (r 8: MLA, dense MLP, shared experts and the fused routed
experts, as `dsft train` saves it), then merges it into FP8 in a fresh subprocess each way:

- stream: `dsft.export.stream_merge.stream_merge` (one tensor at a time);
- naive: every shard loaded into memory (safetensors `load_file`), the touched weights dequantized, merged and
  re-quantized in place, the shards saved — what a load-the-model merge costs at the least. Skipped (and said so)
  when the checkpoint does not fit in 1.5 × MemAvailable.

Peak RSS is the subprocess's VmHWM. Prints a table; the last line is JSON {peak_rss_bytes, checkpoint_bytes,
ratio, naive_peak_rss_bytes, naive_ratio, …} (ratio = stream peak / checkpoint bytes; goal ≤ 0.35).

    python benchmarks/merge_memory.py [--layers 19] [--experts 32] [--workdir /tmp] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dsft.model import fp8  # noqa: E402

SHAPE = dict(hidden=2048, inter=4096, moe_inter=1024, heads=16, q_lora=768, kv_lora=512, nope=128, rope=64, v=128,
             vocab=32000)
R = 8


def random_fp8(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes (NaN codes replaced) and random block scales: as fast as writing bytes."""
    q = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    q[(q & 0x7F) == 0x7F] = 0x10
    s = torch.rand(fp8.scale_shape((rows, cols)), generator=g) * 1e-4 + 1e-5
    return q.view(fp8.FP8_DTYPE), s


def layer_linears(layer: int, dense: bool, experts: int) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of one V3 decoder layer's FP8 linears."""
    h, p = SHAPE["hidden"], f"model.layers.{layer}."
    qk = SHAPE["nope"] + SHAPE["rope"]
    out = {p + "self_attn.q_a_proj.weight": (SHAPE["q_lora"], h),
           p + "self_attn.q_b_proj.weight": (SHAPE["heads"] * qk, SHAPE["q_lora"]),
           p + "self_attn.kv_a_proj_with_mqa.weight": (SHAPE["kv_lora"] + SHAPE["rope"], h),
           p + "self_attn.kv_b_proj.weight": (SHAPE["heads"] * (SHAPE["nope"] + SHAPE["v"]), SHAPE["kv_lora"]),
           p + "self_attn.o_proj.weight": (h, SHAPE["heads"] * SHAPE["v"])}
    mlps = [("mlp.", SHAPE["inter"])] if dense else \
        [("mlp.shared_experts.", SHAPE["moe_inter"])] + [(f"mlp.experts.{e}.", SHAPE["moe_inter"]) for e in range(experts)]
    for prefix, inter in mlps:
        out.update({p + prefix + "gate_proj.weight": (inter, h), p + prefix + "up_proj.weight": (inter, h),
                    p + prefix + "down_proj.weight": (h, inter)})
    return out


def layer_tensors(layer: int, dense: bool, experts: int, g: torch.Generator, mtp: bool = False) -> dict[str, torch.Tensor]:
    h, p = SHAPE["hidden"], f"model.layers.{layer}."
    t: dict[str, torch.Tensor] = {}
    for name, (o, i) in layer_linears(layer, dense, experts).items():
        t[name], t[name + "_scale_inv"] = random_fp8(o, i, g)
    for n in ("input_layernorm", "post_attention_layernorm"):
        t[p + n + ".weight"] = torch.ones(h, dtype=torch.bfloat16)
    t[p + "self_attn.q_a_layernorm.weight"] = torch.ones(SHAPE["q_lora"], dtype=torch.bfloat16)
    t[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(SHAPE["kv_lora"], dtype=torch.bfloat16)
    if not dense:
        t[p + "mlp.gate.weight"] = (torch.randn(experts, h, generator=g) * 0.02).to(torch.bfloat16)
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(experts)
    if mtp:
        t[p + "eh_proj.weight"], t[p + "eh_proj.weight_scale_inv"] = random_fp8(h, 2 * h, g)
        for n in ("enorm", "hnorm", "shared_head.norm"):
            t[p + n + ".weight"] = torch.ones(h, dtype=torch.bfloat16)
        for n in ("shared_head.head", "embed_tokens"):
            t[p + n + ".weight"] = (torch.randn(SHAPE["vocab"], h, generator=g) * 0.02).to(torch.bfloat16)
    return t


def write_checkpoint(out: Path, layers: int, experts: int, per_shard: int) -> int:
    """The FP8 checkpoint (layer 0 dense, then MoE, then one MTP layer), `per_shard` layers a shard; its bytes."""
    g = torch.Generator().manual_seed(0)
    groups = [list(range(i, min(i + per_shard, layers + 1))) for i in range(0, layers + 1, per_shard)]
    wmap, total = {}, 0
    out.mkdir(parents=True)
    for k, group in enumerate(groups, 1):
        t: dict[str, torch.Tensor] = {}
        for layer in group:
            t.update(layer_tensors(layer, layer == 0, experts, g, mtp=layer == layers))
        if k == 1:
            t["model.embed_tokens.weight"] = (torch.randn(SHAPE["vocab"], SHAPE["hidden"], generator=g) * 0.02).to(torch.bfloat16)
        if k == len(groups):
            t["model.norm.weight"] = torch.ones(SHAPE["hidden"], dtype=torch.bfloat16)
            t["lm_head.weight"] = (torch.randn(SHAPE["vocab"], SHAPE["hidden"], generator=g) * 0.02).to(torch.bfloat16)
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        wmap.update({n: name for n in t})
        total += sum(x.numel() * x.element_size() for x in t.values())
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": SHAPE["hidden"],
           "intermediate_size": SHAPE["inter"], "moe_intermediate_size": SHAPE["moe_inter"],
           "num_hidden_layers": layers, "num_nextn_predict_layers": 1, "n_routed_experts": experts,
           "n_shared_experts": 1, "first_k_dense_replace": 1, "num_attention_heads": SHAPE["heads"],
           "q_lora_rank": SHAPE["q_lora"], "kv_lora_rank": SHAPE["kv_lora"], "qk_nope_head_dim": SHAPE["nope"],
           "qk_rope_head_dim": SHAPE["rope"], "v_head_dim": SHAPE["v"], "vocab_size": SHAPE["vocab"],
           "torch_dtype": "bfloat16", "quantization_config": fp8.quantization_config()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def write_adapter(out: Path, layers: int, experts: int) -> int:
    """A PEFT-format LoRA (r 8) on every MLA, dense-MLP, shared-expert linear and the fused routed experts."""
    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {}
    h, mi = SHAPE["hidden"], SHAPE["moe_inter"]
    for layer in range(layers):
        for name, (o, i) in layer_linears(layer, layer == 0, 0).items():
            m = "base_model.model." + name.removesuffix(".weight")
            t[m + ".lora_A.weight"] = torch.randn(R, i, generator=g) * 0.01
            t[m + ".lora_B.weight"] = torch.randn(o, R, generator=g) * 0.01
        if layer:
            m = f"base_model.model.model.layers.{layer}.mlp.experts"
            t[m + ".base_layer.lora_A.weight"] = torch.randn(R * experts, h, generator=g) * 0.01  # gate_up_proj
            t[m + ".base_layer.lora_B.weight"] = torch.randn(2 * mi, R * experts, generator=g) * 0.01
            t[m + ".lora_A.weight"] = torch.randn(R * experts, mi, generator=g) * 0.01  # down_proj
            t[m + ".lora_B.weight"] = torch.randn(h, R * experts, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(t, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 2 * R,
                                                         "use_dora": False, "use_rslora": False}))
    return (out / "adapter_model.safetensors").stat().st_size


STREAM = """
import json, sys
from dsft.export.stream_merge import peak_rss_bytes, stream_merge
before = peak_rss_bytes()
rep = stream_merge(sys.argv[1], sys.argv[2], adapter_dir=sys.argv[3], out_format="fp8")
print(json.dumps({"before": before, "peak": rep["peak_rss_bytes"], "seconds": rep["seconds"],
                  "requant_error": rep["requant_error"], "merged": rep["merged"], "copied": rep["copied"]}))
"""

NAIVE = """
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from dsft.export.stream_lora import AdapterTensors, merged_tensor, plan_edits
from dsft.export.stream_merge import peak_rss_bytes, read_checkpoint
from dsft.model import fp8
t0 = time.perf_counter()
before = peak_rss_bytes()
base, out, adapter = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ck = read_checkpoint(base)
ad = AdapterTensors(adapter)
edits = plan_edits(adapter, json.loads((adapter / "adapter_config.json").read_text()), ck.infos, ad)
model = {}
for shard in ck.shards:  # the whole model in memory, as a load-then-merge does
    model.update({k: v.clone() for k, v in load_file(str(base / shard)).items()})
for name, edit in edits.items():
    w = fp8.dequantize(model[name], model[name + "_scale_inv"])
    model[name], model[name + "_scale_inv"] = fp8.quantize(merged_tensor(w, edit, ad))
out.mkdir()
for shard in ck.shards:
    save_file({k: model[k] for k, s in ck.where.items() if s == shard}, str(out / shard), metadata={"format": "pt"})
print(json.dumps({"before": before, "peak": peak_rss_bytes(), "seconds": round(time.perf_counter() - t0, 2)}))
"""


def run_merge(code: str, base: Path, out: Path, adapter: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code, str(base), str(out), str(adapter)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"merge subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=19, help="decoder layers (layer 0 dense); + 1 MTP layer")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer")
    ap.add_argument("--layers-per-shard", type=int, default=2)
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsft-merge-memory-", dir=args.workdir))
    try:
        free = shutil.disk_usage(work).free
        t0 = time.perf_counter()
        ckpt = write_checkpoint(work / "base", args.layers, args.experts, args.layers_per_shard)
        adapter_bytes = write_adapter(work / "adapter", args.layers, args.experts)
        shards = len(list((work / "base").glob("*.safetensors")))
        print(f"checkpoint: {ckpt / 1e9:.2f} GB in {shards} shards ({args.layers} layers + MTP, {args.experts} experts), "
              f"adapter {adapter_bytes / 1e6:.0f} MB; written in {time.perf_counter() - t0:.0f} s; disk free "
              f"before {free / 1e9:.1f} GB", flush=True)
        if free < 3.2 * ckpt:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need ≈ {3.2 * ckpt / 1e9:.1f} GB")
        stream = run_merge(STREAM, work / "base", work / "out-stream", work / "adapter")
        shutil.rmtree(work / "out-stream")
        naive, why = None, ""
        if args.skip_naive:
            why = "skipped (--skip-naive)"
        elif ckpt * 1.5 > mem_available():
            why = f"skipped: needs ≥ {ckpt * 1.5 / 1e9:.1f} GB, {mem_available() / 1e9:.1f} GB available"
        else:
            naive = run_merge(NAIVE, work / "base", work / "out-naive", work / "adapter")
        rows = [("stream (dsft)", stream)] + ([("naive (load all)", naive)] if naive else [])
        print(f"{'merge':<18}{'peak RSS':>12}{'after imports':>15}{'peak/ckpt':>11}{'seconds':>9}")
        for label, r in rows:
            print(f"{label:<18}{r['peak'] / 1e9:>10.2f} GB{r['before'] / 1e9:>12.2f} GB{r['peak'] / ckpt:>11.3f}"
                  f"{r['seconds']:>9.0f}")
        if why:
            print(f"naive (load all): {why}")
        err = {k: (round(v["max_rel"], 5), round(v["mean_rel"], 6)) for k, v in stream["requant_error"].items()}
        print(f"re-quantization error of the stream merge (max, mean relative; vs merged BF16): {err}")
        print(json.dumps({"peak_rss_bytes": stream["peak"], "checkpoint_bytes": ckpt, "ratio": round(stream["peak"] / ckpt, 4),
                          "shards": shards, "adapter_bytes": adapter_bytes, "stream_seconds": stream["seconds"],
                          "rss_after_imports_bytes": stream["before"],
                          "naive_peak_rss_bytes": naive["peak"] if naive else None,
                          "naive_ratio": round(naive["peak"] / ckpt, 4) if naive else None,
                          "naive_seconds": naive["seconds"] if naive else None, "naive_note": why or None}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
