"""ESFT vs LoRA vs full fine-tuning on a small DeepSeek-V2-shape MoE (CPU): domain gain against general forgetting.

1. Pre-train a random-init V2-shape MoE (8 routed experts top-2 + 1 shared, 4 MoE layers after 1 dense layer, hidden
   128, the embedded 8 k tokenizer) on a mixture of two real corpora — Chinese medical QA
   (`medical_dialogue_internal_medicine`) and general Chinese instructions (`alpaca_zh_demo`) — with every weight
   trainable (router included) and a Switch-style load-balancing loss (weight `--balance`), one thread, 400 steps of
   16 × 128 tokens by default. Routing statistics (entropy, medical/general overlap) are reported per layer.
2. Fine-tune the pre-trained model on held-apart medical QA with dsft's own `dsft train` (its CLI, in a worker
   process per method): ESFT-Token, ESFT-Gate, LoRA and full fine-tuning, the same steps, batch and seed. The lr is
   chosen per method from a small grid by the loss on held-apart medical validation records (`--lr-full`,
   `--lr-adapter`; `--lr` gives every method one grid); two workers run at a time, one thread each.
3. Per method, for the chosen lr: held-out domain loss, held-out general loss before → after (forgetting), trainable
   parameters, the file a user ships (delta / adapter / model), the worker's peak RSS, training time. Then wall
   time, CPU time (this process + its workers) and the load average. Last line: JSON.

    PYTHONPATH=src .venv/bin/python benchmarks/esft_vs_lora.py            # the full run (≈ 7 min on an idle 2-core CPU)
    PYTHONPATH=src .venv/bin/python benchmarks/esft_vs_lora.py --quick    # a smoke run (≈ 1 min of CPU)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("DSFT_SHARED_DATA", "/work/shared/data"))
METHODS = ("esft-token", "esft-gate", "lora", "full")


# ---------------------------------------------------------------- data
def medical_records() -> list[dict]:
    from dsft.records import qa_messages

    raw = (DATA / "medical_dialogue_internal_medicine.gb18030.csv").read_bytes().decode("gb18030")
    out, seen = [], set()
    for i, r in enumerate(csv.DictReader(io.StringIO(raw))):
        if r["answer"] in seen:  # template replies: keep one
            continue
        seen.add(r["answer"])
        f = {"question": r["title"], "context": r["ask"], "answer": r["answer"]}
        out.append({"id": f"med:{i}", "messages": qa_messages(f), "domain": "medical"})
    return out


def general_records() -> list[dict]:
    rows = json.loads((DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    return [{"id": f"alpaca:{i}", "domain": "general",
             "messages": [{"role": "user", "content": (r["instruction"] + ("\n" + r["input"] if r["input"] else ""))},
                          {"role": "assistant", "content": r["output"]}]} for i, r in enumerate(rows)]


def splits(args) -> dict[str, list[dict]]:
    med, gen = medical_records(), general_records()
    rng = random.Random(0)
    rng.shuffle(med)
    rng.shuffle(gen)
    a, b, c = args.eval, args.eval + args.val, args.eval + args.val + args.ft_records
    return {"med_test": med[:a], "gen_test": gen[:a], "med_val": med[a:b], "med_ft": med[b:c],
            "pretrain": med[c:][:args.pretrain_medical] + gen[a:]}


# ---------------------------------------------------------------- model + pre-training
def build_base(out: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    from dsft.model.tokenizer import embedded_tokenizer_dir

    tok = tf.AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    cfg = tf.DeepseekV2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=32, n_group=1, topk_group=1, topk_method="greedy", max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = tf.DeepseekV2ForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def padded(batch, pad_id: int, *, all_tokens: bool):
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], mask[i, :n] = torch.tensor(e.input_ids), 1
        labels[i, :n] = torch.tensor(e.input_ids if all_tokens else e.labels)
    return ids, mask, labels


def pretrain(base: Path, out: Path, records: list[dict], args) -> dict:
    """Every weight (router included) on the mixture, LM loss on all tokens + α · Switch balance loss per layer."""
    import torch

    from dsft.model.load import load_model
    from dsft.model.tokenizer import load_tokenizer
    from dsft.train.encode import encode_records
    from dsft.train.esft import moe_layers

    torch.manual_seed(0)
    tok = load_tokenizer(str(base))
    exs = encode_records(tok, records, args.max_len)[0]
    model = load_model(base, dtype="float32")
    model.train()
    aux: list = []

    def hook(_m, _inp, out):
        logits, _, idx = out
        probs = logits.softmax(-1)
        e = probs.shape[-1]
        frac = torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel()
        aux.append(e * (frac * probs.mean(0)).sum())
    hooks = [la.mlp.gate.register_forward_hook(hook) for la in moe_layers(model)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(0)
    t0, c0, losses = time.perf_counter(), time.process_time(), []
    for step in range(args.pretrain_steps):
        batch = rng.sample(exs, args.pretrain_batch)
        ids, mask, labels = padded(batch, tok.pad_token_id, all_tokens=True)
        aux.clear()
        lr = args.pretrain_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        (loss + args.balance * sum(aux)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for h in hooks:
        h.remove()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {"steps": args.pretrain_steps, "loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "examples": len(exs), "tokens_per_step": args.pretrain_batch * args.max_len}


# ---------------------------------------------------------------- measurements
def held_out_loss(model, tok, records: list[dict], max_len: int) -> float:
    """Mean token loss on the assistant tokens of `records` (dsft's training labels)."""
    import torch

    from dsft.train.encode import encode_records

    exs = encode_records(tok, records, max_len)[0]
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(exs), 16):
            ids, mask, labels = padded(exs[b:b + 16], tok.pad_token_id, all_tokens=False)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            tgt = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
    return total / n


def routing_stats(model, tok, records: dict[str, list[dict]], max_len: int) -> dict:
    """Per MoE layer: routing entropy on each corpus, and how much the two corpora share their top experts."""
    from dsft.train.encode import encode_records
    from dsft.train.esft_profile import profile_experts

    prof = {name: profile_experts(model, [e.input_ids for e in encode_records(tok, recs, max_len)[0]],
                                  sample_tokens=20000, seed=0, pad_id=tok.pad_token_id)
            for name, recs in records.items()}
    out = {}
    for li in prof["medical"]["layers"]:
        m, g = prof["medical"]["layers"][li]["token"], prof["general"]["layers"][li]["token"]
        out[li] = {"entropy_medical": round(prof["medical"]["layers"][li]["routing_entropy"], 3),
                   "entropy_general": round(prof["general"]["layers"][li]["routing_entropy"], 3),
                   "overlap": round(sum(min(a, b) for a, b in zip(m, g, strict=True)), 3),
                   "medical": [round(x, 3) for x in m], "general": [round(x, 3) for x in g]}
    return out


# ---------------------------------------------------------------- fine-tuning (one worker process per method)
def method_config(method: str, run_dir: Path, base: Path, lr: float, args) -> dict:
    train = {"method": "esft" if method.startswith("esft") else method, "max_steps": args.ft_steps,
             "per_device_train_batch_size": args.batch, "learning_rate": lr, "report_to": ["none"],
             "save_steps": 100000, "logging_steps": 10, "seed": 0, "lr_scheduler": "cosine", "warmup_steps": 10}
    cfg = {"run_dir": str(run_dir), "model": {"name_or_path": str(base), "dtype": "float32"},
           "data": {"max_seq_length": args.max_len}, "train": train}
    if method.startswith("esft"):
        cfg["esft"] = {"score": method.split("-")[1], "sample_tokens": args.sample_tokens}
    if method == "lora":
        cfg["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "modules_to_save": []}
    return cfg


def train_one(method: str, lr: float, work: Path, base: Path, records: list[dict], args) -> dict:
    """One `dsft train CONFIG --force` (dsft's own CLI, in this process) at one lr; returns its train manifest."""
    import yaml

    from dsft.cli import main as dsft_main
    from dsft.run import RunDir, write_jsonl

    run = RunDir(work / f"{method}-lr{lr:g}")
    d = run.stage_dir("data")
    write_jsonl(d / "train.jsonl", records)
    write_jsonl(d / "test.jsonl", [])
    run.write_manifest("data", {"train": "train.jsonl", "test": "test.jsonl", "eval": None,
                                "counts": {"train": len(records)}})
    cfg_path = run.root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(method_config(method, run.root, base, lr, args), allow_unicode=True), "utf-8")
    if dsft_main(["train", str(cfg_path), "--force"]):
        raise SystemExit(f"{method} lr {lr:g}: dsft train failed (see the output above)")
    m = run.read_manifest("train")
    m["run_dir"] = str(run.root)
    return m


def trained_model(m: dict):
    """The fine-tuned model in memory: train/model/ (full, ESFT: base + delta merged by dsft) or base + LoRA adapter."""
    from dsft.model.adapters import load_adapter
    from dsft.model.load import load_model

    tdir = Path(m["run_dir"]) / "train"
    if m["adapter"]:
        return load_adapter(load_model(m["base_model"], dtype="float32"), tdir / "adapter")
    return load_model(tdir / "model", dtype="float32")


def shipped_file(m: dict) -> Path:
    tdir = Path(m["run_dir"]) / "train"
    return {"esft": tdir / "esft" / "esft_delta.safetensors", "lora": tdir / "adapter" / "adapter_model.safetensors",
            "full": tdir / "model" / "model.safetensors"}[m["method"]]


def worker(spec_path: Path) -> int:
    """One method: train at every lr of its grid, pick the lr by validation loss, measure the chosen run on test."""
    import torch

    spec = json.loads(spec_path.read_text("utf-8"))
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    from dsft.model.tokenizer import load_tokenizer
    from dsft.run import read_jsonl

    base, work, method = Path(spec["base"]), Path(spec["work"]), spec["method"]
    recs = {k: read_jsonl(Path(v)) for k, v in spec["records"].items()}
    tok = load_tokenizer(str(base))
    grid = []
    for lr in spec["lrs"]:
        m = train_one(method, lr, work, base, recs["med_ft"], args)
        val = held_out_loss(trained_model(m), tok, recs["med_val"], args.max_len)
        grid.append({"lr": lr, "val_loss": val, "manifest": m})
        print(f"{method} lr {lr:g}: validation domain loss {val:.4f} ({m['train_seconds']} s)", flush=True)
    best = min(grid, key=lambda g: g["val_loss"])
    m, model = best["manifest"], trained_model(best["manifest"])
    res = {"method": method, "lr": best["lr"], "grid": [{"lr": g["lr"], "val_loss": round(g["val_loss"], 4),
                                                         "train_seconds": g["manifest"]["train_seconds"]}
                                                        for g in grid],
           "trainable_params": m["trainable_params"], "total_params": m["total_params"],
           "shipped_bytes": shipped_file(m).stat().st_size, "train_seconds": m["train_seconds"],
           "loss_first": m["loss_first"], "loss_last": m["loss_last"], "method_info": m["method_info"],
           "domain_loss": held_out_loss(model, tok, recs["med_test"], args.max_len),
           "general_loss": held_out_loss(model, tok, recs["gen_test"], args.max_len)}
    Path(spec["result"]).write_text(json.dumps(res, ensure_ascii=False), "utf-8")
    return 0


def run_workers(methods: list[str], work: Path, base: Path, records: dict[str, Path], args) -> list[dict]:
    """A worker process per method, `args.parallel` at a time (each `args.threads` threads); peak RSS per process."""
    queue, running, results = list(methods), {}, {}
    while queue or running:
        while queue and len(running) < args.parallel:
            method = queue.pop(0)
            spec = {"method": method, "lrs": lr_grid(method, args), "base": str(base), "work": str(work),
                    "records": {k: str(v) for k, v in records.items()}, "args": vars(args),
                    "result": str(work / f"{method}.result.json")}
            spec_path = work / f"{method}.spec.json"
            spec_path.write_text(json.dumps(spec), "utf-8")
            log = (work / f"{method}.log").open("w", encoding="utf-8")
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, text=True)
            running[p.pid] = (method, time.perf_counter(), log)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        method, t0, log = running.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status):
            tail = (work / f"{method}.log").read_text("utf-8", errors="replace")[-3000:]
            raise SystemExit(f"{method}: worker failed:\n{tail}")
        r = json.loads((work / f"{method}.result.json").read_text("utf-8"))
        r.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), process_seconds=round(time.perf_counter() - t0, 1),
                 process_cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1))
        results[method] = r
        print(f"{method}: lr {r['lr']:g} (grid {[(g['lr'], g['val_loss']) for g in r['grid']]}), domain "
              f"{r['domain_loss']:.4f}, general {r['general_loss']:.4f}, {r['process_seconds']} s wall, "
              f"{r['process_cpu_seconds']} s CPU", flush=True)
    return [results[m] for m in methods]


def lr_grid(method: str, args) -> list[float]:
    text = args.lr if args.lr else (args.lr_full if method == "full" else args.lr_adapter)
    return [float(x) for x in text.split(",")]


# ---------------------------------------------------------------- report
def table(rows: list[dict], before: dict) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = [f"{'method':<11} {'lr':>6} {'domain loss':>11} {'vs full':>8} {'general loss':>19} {'forgetting':>10} "
             f"{'trainable':>15} {'shipped':>10} {'peak RSS':>9} {'train s':>8}",
             f"{'base':<11} {'':>6} {before['domain']:>11.4f} {'':>8} {before['general']:>19.4f}"]
    for r in rows:
        vs = f"{100 * (r['domain_loss'] / full['domain_loss'] - 1):+.1f}%" if full else ""
        lines.append(
            f"{r['method']:<11} {r['lr']:>6g} {r['domain_loss']:>11.4f} {vs:>8} "
            f"{before['general']:>8.4f} → {r['general_loss']:.4f} {r['forgetting']:>+10.4f} "
            f"{r['trainable_params']:>9,} {100 * r['trainable_params'] / r['total_params']:>4.1f}% "
            f"{r['shipped_bytes'] / 2**20:>8.2f}MB {r['peak_rss_mib']:>7.0f}MB {r['train_seconds']:>8.1f}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows}
    full, lora = by["full"], by["lora"]
    out = {}
    for m in ("esft-token", "esft-gate"):
        e = by[m]
        out[m] = {"domain_within_2pct_of_full": e["domain_loss"] <= 1.02 * full["domain_loss"],
                  "forgetting_le_half_full": e["forgetting"] <= 0.5 * full["forgetting"],
                  "forgetting_below_lora": e["forgetting"] < lora["forgetting"],
                  "trainable_le_25pct_full": e["trainable_params"] <= 0.25 * full["trainable_params"]}
    return out


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-esft", help="working folder (models, runs)")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--pretrain-medical", type=int, default=1500, help="medical records in the pre-training mixture")
    ap.add_argument("--balance", type=float, default=0.001, help="load-balancing loss weight in pre-training")
    ap.add_argument("--ft-steps", type=int, default=60)
    ap.add_argument("--ft-records", type=int, default=1600)
    ap.add_argument("--lr", default="", help="one lr grid for every method (comma-separated); overrides the two below")
    ap.add_argument("--lr-full", default="1e-4,3e-4,1e-3", help="full fine-tuning's lr grid")
    ap.add_argument("--lr-adapter", default="1e-3,3e-3,1e-2", help="ESFT's and LoRA's lr grid")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="fine-tuning batch (every method)")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--eval", type=int, default=100, help="held-out test records per corpus")
    ap.add_argument("--val", type=int, default=64, help="medical validation records (lr choice)")
    ap.add_argument("--sample-tokens", type=int, default=32768, help="ESFT profile sample")
    ap.add_argument("--threads", type=int, default=1, help="threads per fine-tuning worker")
    ap.add_argument("--parallel", type=int, default=2, help="fine-tuning workers at a time")
    ap.add_argument("--pretrain-threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.ft_steps, args.eval, args.val, args.ft_records = 40, 12, 24, 16, 200
        args.pretrain_medical, args.sample_tokens = 300, 4096
        args.lr_full, args.lr_adapter = "1e-3", "3e-3"
    return args


def prepare(args, work: Path, data: dict[str, list[dict]]) -> tuple[dict, dict, dict, dict[str, Path]]:
    """Pre-train the base; its routing statistics and held-out losses; the records the workers read."""
    import torch

    from dsft.model.load import load_model
    from dsft.model.tokenizer import load_tokenizer
    from dsft.run import write_jsonl

    torch.set_num_threads(args.pretrain_threads)
    pre = pretrain(build_base(work / "random-init"), work / "pretrained", data["pretrain"], args)
    tok = load_tokenizer(str(work / "pretrained"))
    model = load_model(work / "pretrained", dtype="float32")
    routing = routing_stats(model, tok, {"medical": data["med_test"], "general": data["gen_test"]}, args.max_len)
    before = {"domain": held_out_loss(model, tok, data["med_test"], args.max_len),
              "general": held_out_loss(model, tok, data["gen_test"], args.max_len),
              "val": held_out_loss(model, tok, data["med_val"], args.max_len)}
    paths = {}
    for k in ("med_ft", "med_val", "med_test", "gen_test"):
        paths[k] = work / "records" / f"{k}.jsonl"
        paths[k].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths[k], data[k])
    return pre, routing, before, paths


def cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(Path(args.worker))
    t_all, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = splits(args)
    pre, routing, before, paths = prepare(args, work, data)
    rows = run_workers(args.methods.split(","), work, work / "pretrained", paths, args)
    for r in rows:
        r["forgetting"] = r["general_loss"] - before["general"]
    print(f"\npre-training: {pre['steps']} steps × {args.pretrain_batch} on {pre['examples']} records (medical + "
          f"alpaca_zh), balance weight {args.balance}, loss {pre['loss_first']:.3f} → {pre['loss_last']:.3f}, "
          f"{pre['seconds']} s")
    print("routing after pre-training (token shares on held-out text; entropy 1 = uniform; overlap 1 = identical):")
    for li, s in routing.items():
        print(f"  layer {li}: entropy medical {s['entropy_medical']:.3f} general {s['entropy_general']:.3f}, "
              f"overlap {s['overlap']:.3f}; medical {s['medical']}")
    for r in rows:
        if r["method"].startswith("esft"):
            print(f"{r['method']} experts: {r['method_info']['experts']}")
    print(f"lr per method: chosen from its grid by the loss on {args.val} held-apart medical validation records "
          f"(same {args.ft_steps} steps × batch {args.batch}, seed 0): "
          + "; ".join(f"{r['method']} {r['lr']:g} of {[g['lr'] for g in r['grid']]}" for r in rows))
    print("\n" + table(rows, before))
    seconds, cpu = round(time.perf_counter() - t_all, 1), round(cpu_seconds(), 1)
    print(f"\ntotal: {seconds / 60:.1f} min wall, {cpu / 60:.1f} CPU-min (≈ {cpu / 120:.1f} min on an idle 2-core "
          f"machine); load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    result = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "pretrain": pre,
              "routing": routing, "before": before, "rows": rows, "seconds": seconds, "cpu_seconds": cpu,
              "loadavg_start": load_start[0], "loadavg_end": os.getloadavg()[0]}
    if {"full", "lora", "esft-token", "esft-gate"} <= {r["method"] for r in rows}:
        result["goals"] = verdict(rows)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
