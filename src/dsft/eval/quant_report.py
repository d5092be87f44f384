"""Quantization report: measure every export variant on held-out records (size, perplexity, task metrics, speed).

Rows are filled one variant at a time (`QuantReport.add`), so the eval stage loads each variant once and scores it
here and in its own before/after tables from the same model object. The first variant is the reference (Δ columns).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsft.errors import DataError
from dsft.eval.runners import GGUFRunner, TorchRunner, hardware
from dsft.report.markup import md_table
from dsft.report.numbers import fmt_num
from dsft.report.plots import pyplot, save_png
from dsft.run import atomic_write_json, atomic_write_text

FILES = {"json": "quant_report.json", "md": "quant_report.md", "png": "quant_report.png"}
TASK_METRIC = ("accuracy (department classification, the eval stage's label prompt and log-likelihood scoring) "
               "and rouge_l (greedy answer vs reference; dsft.eval.metrics, character-level for Chinese)")


# ------------------------------------------------------------------------------------------------ samples
def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build_samples(tok, records: list[dict[str, Any]], n: int, max_len: int = 384) -> list[dict[str, Any]]:
    """Per record: prompt ids (up to the last assistant turn), full ids, the answer's start and reference text."""
    from dsft.eval.predict import continuation_text
    from dsft.records import prompt_and_reference

    out = []
    for rec in records:
        if not any(m["role"] == "assistant" for m in rec.get("messages") or []):
            continue
        prompt_msgs, reference = prompt_and_reference(rec)
        p_text, c_text = continuation_text(tok, prompt_msgs, reference)
        prompt = _ids(tok, p_text)
        full = (prompt + _ids(tok, c_text))[:max_len]
        if len(prompt) >= len(full):
            continue
        out.append({"prompt": prompt, "full": full, "start": len(prompt), "reference": reference})
        if len(out) >= n:
            break
    if not out:
        raise DataError("quantization report: no held-out record with an assistant answer to measure on")
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
        for lab in labels:
            if lab not in conts:
                conts[lab] = _ids(tok, continuation_text(tok, msgs, lab)[1])
        out.append({"prompt": _ids(tok, prompt_text(tok, msgs)), "gold": str(gold)})
        if len(out) >= n:
            break
    return [{**o, "continuations": conts} for o in out]


# ------------------------------------------------------------------------------------------------ measuring
def measure(runner, samples: list[dict[str, Any]], tok, new_tokens: int, label_samples: list[dict[str, Any]] | None = None,
            label_scoring: str = "sum", progress: str | None = None) -> dict[str, Any]:
    """Perplexity of the reference answers, ROUGE-L of greedy answers, label accuracy, prefill and decode tokens/s.
    `progress`: the description of a terminal progress bar over the samples (none when None or piped)."""
    from dsft.eval.metrics import rouge_l
    from dsft.report.progress import bar

    pbar = bar(progress or "", total=len(samples) + len(label_samples or []), unit=" sample", leave=False,
               enabled=None if progress else False)

    nll = ntok = prefill_t = decode_t = 0.0
    prefill_n = decode_n = 0
    preds, gens = [], []
    eos = tok.eos_token_id
    runner.generate_timed(samples[0]["prompt"], 2)  # warm-up (allocations, kernel selection)
    for s in samples:
        a, b = runner.nll(s["full"], s["start"])
        nll, ntok = nll + a, ntok + b
        toks, tp, td = runner.generate_timed(s["prompt"], new_tokens)
        prefill_t, decode_t = prefill_t + tp, decode_t + td
        prefill_n, decode_n = prefill_n + len(s["prompt"]), decode_n + len(toks) - 1
        gens.append(toks)
        preds.append(tok.decode(toks[: toks.index(eos)] if eos in toks else toks, skip_special_tokens=True))
        pbar.update(1)
    correct = 0
    for item in label_samples or []:
        scores = {}
        for lab, cont in item["continuations"].items():
            v, k = runner.nll(item["prompt"] + cont, len(item["prompt"]))
            scores[lab] = -v / max(k, 1) if label_scoring == "mean" else -v
        correct += max(scores, key=scores.get) == item["gold"]
        pbar.update(1)
    pbar.close()
    return {
        "perplexity": math.exp(nll / max(ntok, 1)),
        "rouge_l": rouge_l(preds, [s["reference"] for s in samples]),
        "accuracy": correct / len(label_samples) if label_samples else None,
        "prefill_tok_s": prefill_n / prefill_t if prefill_t else None,
        "decode_tok_s": decode_n / decode_t if decode_t else None,
        "tokens_scored": int(ntok),
        "gens": gens,
    }


def _ratio(a, b):
    return a / b if a and b else None


def _delta(a, b):
    return None if a is None or b is None else a - b


class QuantReport:
    """The quantization report of one export on fixed samples, filled one variant at a time, then written."""

    def __init__(self, cfg, tok, records: list[dict[str, Any]] | None, labels: list[str] | None) -> None:
        import torch

        from dsft.model.probes import PROBE_CONVERSATIONS

        self.cfg, self.ecfg, self.tok = cfg, cfg.export, tok
        self.threads = self.ecfg.report_threads or torch.get_num_threads()
        self.clock = time.process_time if self.ecfg.report_clock == "cpu" else time.perf_counter
        records = records or [{"messages": m} for m in PROBE_CONVERSATIONS]
        self.samples = build_samples(tok, records, self.ecfg.report_samples)
        self.label_samples = build_label_samples(tok, records, labels, cfg, self.ecfg.report_samples)
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[str, Any] | None = None

    @contextlib.contextmanager
    def threads_set(self) -> Iterator[None]:
        """torch's thread count set to the report's while measuring (restored after)."""
        import torch

        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(prev)

    def runner(self, variant: dict[str, Any], path: Path, model=None):
        """The engine for a variant: llama.cpp for GGUF, else PyTorch on `model` (bitsandbytes on CUDA: wall clock)."""
        if variant.get("format") == "gguf" or str(path).endswith(".gguf"):
            return GGUFRunner(path, self.threads, self.clock)
        from dsft.model.bnb import on_cuda

        cuda_bnb = variant.get("format") == "safetensors+bitsandbytes" and on_cuda()
        return TorchRunner(model, time.perf_counter if cuda_bnb else self.clock)

    def add(self, variant: dict[str, Any], runner) -> dict[str, Any]:
        """Measure one variant with its runner and append its row (Δ against the first variant added)."""
        t0 = time.perf_counter()
        with self.threads_set():
            m = measure(runner, self.samples, self.tok, self.ecfg.report_new_tokens, self.label_samples,
                        self.cfg.eval.label_scoring, progress=f"eval {variant.get('name', 'variant')}")
        gens = m.pop("gens")
        if self.reference is None:
            self.reference = {**m, "gens": gens, "size": variant["size_bytes"]}
        ref = self.reference
        same = sum(sum(1 for a, b in zip(g, r, strict=False) if a == b) for g, r in zip(gens, ref["gens"], strict=True))
        row = {
            "variant": variant["name"], "engine": variant.get("engine"), "size_bytes": variant["size_bytes"],
            "size_ratio": variant["size_bytes"] / ref["size"],
            "perplexity": m["perplexity"], "perplexity_delta_pct": 100 * (m["perplexity"] / ref["perplexity"] - 1),
            "rouge_l": m["rouge_l"], "rouge_l_delta": m["rouge_l"] - ref["rouge_l"],
            "accuracy": m["accuracy"], "accuracy_delta": _delta(m["accuracy"], ref["accuracy"]),
            "greedy_match": same / max(sum(len(r) for r in ref["gens"]), 1),
            "prefill_tok_s": m["prefill_tok_s"], "decode_tok_s": m["decode_tok_s"],
            "prefill_speedup": _ratio(m["prefill_tok_s"], ref["prefill_tok_s"]),
            "decode_speedup": _ratio(m["decode_tok_s"], ref["decode_tok_s"]),
            "hardware": f"{self._device_name(runner)}, {self.threads} threads",
            "tokens_scored": m["tokens_scored"], "seconds": round(time.perf_counter() - t0, 2),
        }
        self.rows.append(row)
        return row

    @staticmethod
    def _device_name(runner) -> str:
        dev = getattr(runner, "device", None)
        if dev is not None and getattr(dev, "type", "cpu") == "cuda":
            import torch

            return torch.cuda.get_device_name(dev)
        return hardware()

    def write(self, out_dir: str | Path, reference_dtype: str) -> dict[str, Any]:
        """quant_report.json / .md / .png into out_dir → {json, md, png, rows} (paths relative to out_dir)."""
        out_dir = Path(out_dir)
        rep = {
            "reference": self.rows[0]["variant"] if self.rows else None, "dtype": reference_dtype,
            "samples": len(self.samples), "new_tokens": self.ecfg.report_new_tokens, "threads": self.threads,
            "hardware": hardware(), "clock": "process CPU time" if self.ecfg.report_clock == "cpu" else "wall time",
            "task_metric": TASK_METRIC, "classified": len(self.label_samples),
            "perplexity_on": "reference answers (assistant tokens) of the held-out records", "rows": self.rows,
        }
        atomic_write_json(out_dir / FILES["json"], rep)
        atomic_write_text(out_dir / FILES["md"], render_markdown(rep))
        plot(rep, out_dir / FILES["png"])
        return {**FILES, "rows": self.rows}


# ------------------------------------------------------------------------------------------------ output
COLUMNS = ("variant", "engine", "size MB", "size ×", "perplexity", "Δ ppl", "accuracy", "Δ acc", "ROUGE-L", "Δ ROUGE-L",
           "greedy match", "prefill tok/s", "decode tok/s", "decode ×")


def _md_row(r: dict[str, Any]) -> list[str]:
    return [r["variant"], r["engine"], f"{r['size_bytes'] / 1e6:.2f}", fmt_num(r["size_ratio"], "{:.2f}"),
            fmt_num(r["perplexity"], "{:.3f}"), fmt_num(r["perplexity_delta_pct"], "{:+.2f} %"),
            fmt_num(r["accuracy"], "{:.3f}"), fmt_num(r["accuracy_delta"], "{:+.3f}"),
            fmt_num(r["rouge_l"], "{:.4f}"), fmt_num(r["rouge_l_delta"], "{:+.4f}"),
            fmt_num(100 * r["greedy_match"], "{:.0f} %"), fmt_num(r["prefill_tok_s"], "{:.0f}"),
            fmt_num(r["decode_tok_s"], "{:.1f}"), fmt_num(r["decode_speedup"], "{:.2f}")]


def render_markdown(rep: dict[str, Any]) -> str:
    """quant_report.md: how it was measured, then one table row per variant."""
    lines = [
        "# Quantization report",
        "",
        f"Measured in this run on {rep['hardware']} ({rep['threads']} threads, speeds by {rep['clock']}), "
        f"{rep['samples']} held-out records ({rep.get('classified', 0)} classified), "
        f"{rep['new_tokens']} greedy tokens each. Reference: `{rep['reference']}` ({rep['dtype']}). "
        f"Perplexity on {rep['perplexity_on']}; task metric {rep['task_metric']}; greedy match = share of generated "
        f"tokens identical to the reference's.",
        "",
        *md_table(COLUMNS, [_md_row(r) for r in rep["rows"]]),
        "",
    ]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> Path:
    """quant_report.png: size, perplexity, prefill and decode speed per variant."""
    plt = pyplot()
    rows = rep["rows"]
    names = [r["variant"] for r in rows]
    panels = [("size (MB)", [r["size_bytes"] / 1e6 for r in rows]), ("perplexity", [r["perplexity"] for r in rows]),
              ("prefill tokens/s", [r["prefill_tok_s"] or 0 for r in rows]), ("decode tokens/s", [r["decode_tok_s"] or 0 for r in rows])]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.2, 3.4))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]
    for ax, (title, vals) in zip(axes, panels, strict=True):
        ax.bar(names, vals, color=[colors[i % len(colors)] for i in range(len(vals))])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"dsft export variants — {rep['hardware']}", fontsize=9)
    return save_png(fig, path, dpi=90)
