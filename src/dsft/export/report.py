"""Quantization report: measure every export variant on the eval set (size, perplexity, task metric, speed)."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from dsft.errors import DsftError, ExportError
from dsft.run import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


# ------------------------------------------------------------------------------------------------ samples
def build_samples(tok, records: list[dict[str, Any]], n: int, max_len: int = 384) -> list[dict[str, Any]]:
    """Per record: prompt ids (up to the last assistant turn), full ids, the answer's start and reference text."""
    from dsft.eval.predict import continuation_text
    from dsft.records import prompt_and_reference

    out = []
    for rec in records:
        msgs = rec.get("messages") or []
        if not any(m["role"] == "assistant" for m in msgs):
            continue
        prompt_msgs, reference = prompt_and_reference(rec)
        p_text, c_text = continuation_text(tok, prompt_msgs, reference)
        prompt = _ids(tok, p_text)
        full = (prompt + _ids(tok, c_text))[:max_len]
        start = len(prompt)
        if start >= len(full):
            continue
        out.append({"prompt": prompt, "full": full, "start": start, "reference": reference})
        if len(out) >= n:
            break
    if not out:
        raise ExportError("quantization report: no held-out record with an assistant answer to measure on")
    return out


def build_label_samples(tok, records: list[dict[str, Any]], labels: list[str] | None, cfg, n: int) -> list[dict[str, Any]]:
    """Department-classification items (the eval stage's prompt and scoring): prompt ids + one continuation per label."""
    from dsft.eval.predict import continuation_text, prompt_text
    from dsft.records import label_prompt_messages

    if not labels or len(labels) < 2 or not cfg.data.label_prompt:
        return []
    conts: dict[str, list[int]] = {}
    out = []
    for rec in records:
        gold = rec.get("label")
        if gold is None or str(gold) not in labels:
            continue
        msgs = label_prompt_messages(rec, cfg.data.label_prompt, cfg.data.system_prompt)
        p_ids = _ids(tok, prompt_text(tok, msgs))
        for lab in labels:
            if lab not in conts:
                conts[lab] = _ids(tok, continuation_text(tok, msgs, lab)[1])
        out.append({"prompt": p_ids, "gold": str(gold)})
        if len(out) >= n:
            break
    return [{**o, "continuations": conts} for o in out]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ engines
class TorchRunner:
    """Measure a transformers model (plain or dsft-quantized) on CPU/GPU."""

    engine = "torch"

    def __init__(self, model, clock=time.perf_counter) -> None:
        self.clock = clock
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def nll(self, ids: list[int], start: int) -> tuple[float, int]:
        import torch

        x = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=x, use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[start - 1:-1], dim=-1)
        tgt = x[0, start:]
        return float(-lp.gather(1, tgt[:, None]).sum()), int(tgt.numel())

    def generate_timed(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        import torch
        from transformers import DynamicCache

        with torch.no_grad():
            x = torch.tensor([ids], device=self.device)
            cache = DynamicCache(config=self.model.config)
            t0 = self.clock()
            out = self.model(input_ids=x, cache=cache, use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            t1 = self.clock()
            toks = [nxt]
            for _ in range(n - 1):
                out = self.model(input_ids=torch.tensor([[nxt]], device=self.device), cache=cache, use_cache=True)
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
            t2 = self.clock()
        return toks, t1 - t0, t2 - t1


class GGUFRunner:
    """Measure a GGUF file with llama.cpp (llama-cpp-python): one context with all logits, one for speed."""

    engine = "llama.cpp"

    def __init__(self, path: Path, threads: int, clock=time.perf_counter) -> None:
        from dsft.export.gguf import load_gguf

        self.clock = clock
        self.ppl_llm = load_gguf(path, n_ctx=512, logits_all=True, n_threads=threads)
        self.llm = load_gguf(path, n_ctx=512, logits_all=False, n_threads=threads)

    def nll(self, ids: list[int], start: int) -> tuple[float, int]:
        import numpy as np

        llm = self.ppl_llm
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)[start - 1:-1]
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        tgt = np.asarray(ids[start:])
        return float((lse - logits[np.arange(len(tgt)), tgt]).sum()), int(len(tgt))

    def generate_timed(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        import numpy as np

        from dsft.export.gguf import last_logits

        llm = self.llm
        llm.reset()
        t0 = self.clock()
        llm.eval(ids)
        nxt = int(np.argmax(last_logits(llm)))
        t1 = self.clock()
        toks = [nxt]
        for _ in range(n - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits(llm)))
            toks.append(nxt)
        t2 = self.clock()
        return toks, t1 - t0, t2 - t1


def _runner(variant: dict[str, Any], out_dir: Path, dtype: str, threads: int, clock):
    path = out_dir / variant["path"]
    fmt = variant.get("format")
    if fmt == "gguf":
        return GGUFRunner(path, threads, clock)
    if fmt == "dsft-quant":
        from dsft.export.quant import load_quantized

        return TorchRunner(load_quantized(path)[0], clock)
    if fmt == "safetensors":
        from dsft.model.load import load_model

        return TorchRunner(load_model(path, dtype=dtype), clock)
    if fmt == "safetensors+bitsandbytes":
        from dsft.model.bnb import load_quantized_dir, on_cuda

        try:
            model = load_quantized_dir(path)
        except DsftError as err:
            raise ExportError(f"quantization report: {err}") from err
        return TorchRunner(model, time.perf_counter if on_cuda() else clock)
    raise ExportError(f"quantization report: cannot measure variant format {fmt!r}")


def measure(runner, samples: list[dict[str, Any]], tok, new_tokens: int, label_samples: list[dict[str, Any]] | None = None,
            label_scoring: str = "sum") -> dict[str, Any]:
    """Perplexity of the reference answers, ROUGE-L of greedy answers, label accuracy, prefill and decode tokens/s."""
    from dsft.eval.metrics import rouge_l as eval_rouge_l

    nll = ntok = 0.0
    prefill_t = decode_t = 0.0
    prefill_n = decode_n = 0
    preds, refs, gens = [], [], []
    eos = tok.eos_token_id
    runner.generate_timed(samples[0]["prompt"], 2)  # warm-up (allocations, kernel selection)
    for s in samples:
        a, b = runner.nll(s["full"], s["start"])
        nll, ntok = nll + a, ntok + b
        toks, tp, td = runner.generate_timed(s["prompt"], new_tokens)
        prefill_t, decode_t = prefill_t + tp, decode_t + td
        prefill_n, decode_n = prefill_n + len(s["prompt"]), decode_n + len(toks) - 1
        gens.append(toks)
        cut = toks[: toks.index(eos)] if eos in toks else toks
        preds.append(tok.decode(cut, skip_special_tokens=True))
        refs.append(s["reference"])
    correct = 0
    for item in label_samples or []:
        scores = {}
        for lab, cont in item["continuations"].items():
            v, k = runner.nll(item["prompt"] + cont, len(item["prompt"]))
            scores[lab] = -v / max(k, 1) if label_scoring == "mean" else -v
        correct += max(scores, key=scores.get) == item["gold"]
    return {
        "perplexity": math.exp(nll / max(ntok, 1)),
        "rouge_l": eval_rouge_l(preds, refs),
        "accuracy": correct / len(label_samples) if label_samples else None,
        "prefill_tok_s": prefill_n / prefill_t if prefill_t else None,
        "decode_tok_s": decode_n / decode_t if decode_t else None,
        "tokens_scored": int(ntok),
        "_gens": gens,
    }


def quant_report(out_dir: Path, variants: list[dict[str, Any]], cfg, *, records=None, labels=None, conversations=None,
                 tok=None) -> dict[str, Any]:
    """Measure each variant in this run; write quant_report.json / .md / .png under out_dir; return paths + rows."""
    import torch

    from dsft.export.merge import FALLBACK_PROBES

    ecfg = cfg.export
    out_dir = Path(out_dir)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out_dir / "merged"))
    threads = ecfg.report_threads or torch.get_num_threads()
    clock = time.process_time if ecfg.report_clock == "cpu" else time.perf_counter
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not records:
            records = [{"messages": m} for m in (conversations or FALLBACK_PROBES)]
        samples = build_samples(tok, records, ecfg.report_samples)
        label_samples = build_label_samples(tok, records, labels, cfg, ecfg.report_samples)
        rows, ref = [], None
        for v in variants:
            t0 = time.perf_counter()
            runner = _runner(v, out_dir, ecfg.dtype, threads, clock)
            m = measure(runner, samples, tok, ecfg.report_new_tokens, label_samples, cfg.eval.label_scoring)
            del runner
            gens = m.pop("_gens")
            if ref is None:
                ref = {**m, "gens": gens, "size": v["size_bytes"]}
            same = sum(sum(1 for a, b in zip(g, r, strict=False) if a == b) for g, r in zip(gens, ref["gens"], strict=True))
            total = sum(len(r) for r in ref["gens"])
            dev = "cuda" if v.get("format") == "safetensors+bitsandbytes" and torch.cuda.is_available() else "cpu"
            rows.append({
                "variant": v["name"], "engine": v.get("engine"), "size_bytes": v["size_bytes"],
                "size_ratio": v["size_bytes"] / ref["size"],
                "perplexity": m["perplexity"], "perplexity_delta_pct": 100 * (m["perplexity"] / ref["perplexity"] - 1),
                "rouge_l": m["rouge_l"], "rouge_l_delta": m["rouge_l"] - ref["rouge_l"],
                "accuracy": m["accuracy"],
                "accuracy_delta": None if m["accuracy"] is None else m["accuracy"] - ref["accuracy"],
                "greedy_match": same / max(total, 1),
                "prefill_tok_s": m["prefill_tok_s"], "decode_tok_s": m["decode_tok_s"],
                "prefill_speedup": _ratio(m["prefill_tok_s"], ref["prefill_tok_s"]),
                "decode_speedup": _ratio(m["decode_tok_s"], ref["decode_tok_s"]),
                "hardware": (torch.cuda.get_device_name(0) if dev == "cuda" else hardware()) + f", {threads} threads",
                "tokens_scored": m["tokens_scored"], "seconds": round(time.perf_counter() - t0, 2),
            })
    finally:
        torch.set_num_threads(prev_threads)
    rep = {
        "reference": variants[0]["name"], "dtype": ecfg.dtype, "samples": len(samples),
        "new_tokens": ecfg.report_new_tokens, "threads": threads, "hardware": hardware(),
        "clock": "process CPU time" if ecfg.report_clock == "cpu" else "wall time",
        "task_metric": "accuracy (department classification, the eval stage's label prompt and log-likelihood scoring) "
                       "and rouge_l (greedy answer vs reference; dsft.eval.metrics, character-level for Chinese)",
        "classified": len(label_samples),
        "perplexity_on": "reference answers (assistant tokens) of the held-out records",
        "rows": rows,
    }
    atomic_write_json(out_dir / "quant_report.json", rep)
    atomic_write_text(out_dir / "quant_report.md", render_markdown(rep))
    plot(rep, out_dir / "quant_report.png")
    return {"json": "quant_report.json", "md": "quant_report.md", "png": "quant_report.png", "rows": rows}


def _ratio(a, b):
    return a / b if a and b else None


def _f(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, int | float) else "—"


def render_markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# Quantization report",
        "",
        f"Measured in this run on {rep['hardware']} ({rep['threads']} threads, speeds by {rep['clock']}), "
        f"{rep['samples']} held-out records ({rep.get('classified', 0)} classified), "
        f"{rep['new_tokens']} greedy tokens each. Reference: `{rep['reference']}` ({rep['dtype']}). "
        f"Perplexity on {rep['perplexity_on']}; task metric {rep['task_metric']}; greedy match = share of generated "
        f"tokens identical to the reference's.",
        "",
        "| variant | engine | size MB | size × | perplexity | Δ ppl | accuracy | Δ acc | ROUGE-L | Δ ROUGE-L | greedy match | prefill tok/s | decode tok/s | decode × |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        lines.append(
            f"| {r['variant']} | {r['engine']} | {r['size_bytes'] / 1e6:.2f} | {_f(r['size_ratio'])} | {_f(r['perplexity'], '{:.3f}')} | "
            f"{_f(r['perplexity_delta_pct'], '{:+.2f} %')} | {_f(r['accuracy'], '{:.3f}')} | {_f(r['accuracy_delta'], '{:+.3f}')} | "
            f"{_f(r['rouge_l'], '{:.4f}')} | {_f(r['rouge_l_delta'], '{:+.4f}')} | "
            f"{_f(100 * r['greedy_match'], '{:.0f} %')} | {_f(r['prefill_tok_s'], '{:.0f}')} | {_f(r['decode_tok_s'], '{:.1f}')} | "
            f"{_f(r['decode_speedup'])} |")
    lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["rows"]
    names = [r["variant"] for r in rows]
    panels = [("size (MB)", [r["size_bytes"] / 1e6 for r in rows]), ("perplexity", [r["perplexity"] for r in rows]),
              ("prefill tokens/s", [r["prefill_tok_s"] or 0 for r in rows]), ("decode tokens/s", [r["decode_tok_s"] or 0 for r in rows])]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.2, 3.4))
    for ax, (title, vals) in zip(axes, panels, strict=True):
        ax.bar(names, vals, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"][: len(vals)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"dsft export variants — {rep['hardware']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

