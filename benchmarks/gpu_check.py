"""GPU check (one CUDA GPU, ≤ 8 min): bf16 LoRA steps on random-init DeepSeek-LLM-7B-shape and DeepSeek-V2-Lite-shape
models at seq 1024 — real tokens/s, peak memory, packed vs padded — through dsft's own loss, packing and LoRA code.

Run via benchmarks/gpu_check.sh. Sample lengths follow the shipped medical QA subset (≈ 1.4 characters per token);
token ids are random (the weights are random too), so only speed and memory are meaningful. Last line JSON.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time

import torch

from dsft.config import LoraConfig
from dsft.model.adapters import attach_lora
from dsft.model.paths import assets_dir
from dsft.train.batching import collate_packed, collate_padded, real_tokens
from dsft.train.encode import IGNORE, Encoded
from dsft.train.loss import CausalLMLoss

SEQ = 1024


def lengths(n: int) -> list[int]:
    raw = (assets_dir() / "data" / "medical_qa_subset.gb18030.csv").read_bytes().decode("gb18030")
    rows = list(csv.DictReader(io.StringIO(raw)))
    return [min(SEQ, 12 + int((len(r["title"]) + len(r["ask"]) + len(r["answer"])) / 1.4)) for r in rows[:n]]


def samples(n: int, vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths(n):
        ids = torch.randint(100, vocab, (L,), generator=g).tolist()
        p = L // 3  # prompt third, answer two thirds
        out.append(Encoded(ids, [IGNORE] * p + ids[p:]))
    return out


def build(kind: str):
    import transformers as tf

    if kind == "deepseek-llm-7b":
        cfg = tf.LlamaConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        cls = tf.LlamaForCausalLM
    else:  # DeepSeek-V2-Lite: MLA (kv_lora 512, no q LoRA), 64 routed experts top-6 + 2 shared, layer 0 dense
        cfg = tf.DeepseekV2Config(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                  num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                                  num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                                  kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=1,
                                  topk_group=1, max_position_embeddings=4096)
        cls = tf.DeepseekV2ForCausalLM
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = cls(cfg)
        torch.set_default_dtype(torch.float32)
    return model


def measure(kind: str, n_samples: int, micro: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build(kind)
    pm, targets = attach_lora(model, LoraConfig(r=16, dropout=0.0))
    pm.train()
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    lm = CausalLMLoss(pm)
    exs = samples(n_samples, 102400)
    res = {"model": kind, "params_b": round(n_params / 1e9, 2), "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 1),
           "adapted": targets.summary()["by_kind"], "build_s": round(time.perf_counter() - t0, 1)}
    for mode in ("padded", "packed"):
        torch.cuda.reset_peak_memory_stats()
        toks, secs = 0, 0.0
        for s in range(steps + 1):  # step 0 warms up
            chunk = exs[(s * micro) % len(exs):(s * micro) % len(exs) + micro]
            batch = collate_packed(chunk, SEQ, 0) if mode == "packed" else collate_padded(chunk, 0)
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm(batch) / max(1, int((batch["targets"] != IGNORE).sum()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if s:
                secs += time.perf_counter() - t
                toks += real_tokens(batch)
        res[f"{mode}_tokens_per_s"] = round(toks / secs, 1)
        res[f"{mode}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["packed_over_padded"] = round(res["packed_tokens_per_s"] / res["padded_tokens_per_s"], 2)
    del pm, model, opt, lm
    return res


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    out = []
    for kind, micro in (("deepseek-llm-7b", 16), ("deepseek-v2-lite", 16)):
        r = measure(kind, n_samples=400, micro=micro, steps=8)
        out.append(r)
        print(f"{kind:18s} {r['params_b']} B params, LoRA {r['trainable_m']} M: padded {r['padded_tokens_per_s']:.0f} tok/s "
              f"({r['padded_peak_gib']} GiB) | packed {r['packed_tokens_per_s']:.0f} tok/s ({r['packed_peak_gib']} GiB) "
              f"→ {r['packed_over_padded']}×", flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
