"""What each page shows, computed from a run's files: plan bar, data accounting and histograms, eval tables, exports."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from dsft.ui.runs import config_text, manifests, read_json, read_log

MEMORY_PARTS = [("weights", "weights"), ("adapter", "adapter"), ("reference_model", "reference model"),
                ("gradients", "gradients"), ("optimizer", "optimizer state"), ("activations", "activations"),
                ("logits_loss", "logits / loss"), ("reference_forward", "reference forward"),
                ("rollout_kv_cache", "rollout KV cache"), ("rollout_work", "rollout generation"),
                ("overhead", "framework overhead")]
HISTOGRAM_MAX_RECORDS = 20_000  # records read from train/test.jsonl for the length histogram
SIDE_BY_SIDE = 12


def human_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_view(run_dir: Path, m: dict | None) -> dict | None:
    if m is None:
        return None
    plan = read_json(run_dir / "plan" / (m.get("plan_json") or "plan.json")) or {}
    mem = plan.get("memory_bytes") or {}
    peak = mem.get("peak") or m.get("peak_bytes") or 0
    parts = [{"key": k, "label": label, "bytes": mem.get(k, 0), "pct": 100.0 * mem.get(k, 0) / peak if peak else 0.0}
             for k, label in MEMORY_PARTS if mem.get(k)]
    setup = plan.get("setup") or {}
    return {"verdict": m.get("verdict"), "fits": m.get("fits"), "peak": peak, "parts": parts,
            "device_bytes": setup.get("gpu_memory_bytes"), "device": setup.get("gpu") or m.get("device"),
            "setup": setup, "model": plan.get("model") or {}, "recommended": plan.get("recommended") or {},
            "max_micro_batch": m.get("max_micro_batch"), "text": _read_text(run_dir / "plan" / "plan.txt")}


def _read_text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        return None


def _bins(values: list[int], n_bins: int = 20) -> list[dict]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // n_bins))
    counts = [0] * n_bins
    for v in values:
        counts[min(n_bins - 1, (v - lo) // width)] += 1
    top = max(counts) or 1
    return [{"lo": lo + i * width, "hi": lo + (i + 1) * width - 1, "n": c, "pct": 100.0 * c / top}
            for i, c in enumerate(counts)]


def _record_chars(path: Path) -> list[int]:
    """Characters per kept original record (all its turns), from a data split file."""
    out: list[int] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= HISTOGRAM_MAX_RECORDS:
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if str(rec.get("provenance") or "original").startswith("derived"):
                    continue
                out.append(sum(len(str(t.get("content") or "")) for t in rec.get("messages") or [] if isinstance(t, dict)))
    except OSError:
        pass
    return out


def data_view(run_dir: Path, m: dict | None) -> dict | None:
    if m is None:
        return None
    d = run_dir / "data"
    rep = read_json(d / (m.get("report") or "data_report.json")) or {}
    counts = m.get("counts") or rep.get("counts") or {}
    dropped = counts.get("dropped") or {}
    labels = rep.get("labels") or {}
    before, after = labels.get("before") or {}, labels.get("after") or {}
    label_rows = []
    names = sorted(set(before) | set(after), key=lambda k: (-before.get(k, 0), k))  # ties by name: same page each time
    top = max([*before.values(), 1])
    for name in names:
        b, a = before.get(name, 0), after.get(name, 0)
        label_rows.append({"label": name, "before": b, "after": a, "before_pct": 100.0 * b / top, "after_pct": 100.0 * a / top})
    lengths = _record_chars(d / (m.get("train") or "train.jsonl")) + _record_chars(d / (m.get("test") or "test.jsonl"))
    return {"counts": counts, "dropped": sorted(dropped.items(), key=lambda kv: -kv[1]),
            "dropped_total": sum(dropped.values()), "accounting_holds": rep.get("accounting_holds"),
            "files": rep.get("files") or [], "labels": label_rows, "label_field": m.get("label_field"),
            "length_bins": _bins(lengths), "length_records": len(lengths),
            "lengths_chars": rep.get("lengths_chars") or {}, "lengths_tokens": rep.get("lengths_tokens") or {},
            "plots": {k: f"data/{v}" for k, v in (rep.get("plots") or {}).items() if (d / v).is_file()}}


def train_view(run_dir: Path, m: dict | None) -> dict:
    log, _ = read_log(run_dir)
    steps = [r for r in log if "loss" in r and "event" not in r]
    events = [r for r in log if r.get("event") and r.get("event") != "eval"]
    ckpts = sorted((run_dir / "train" / "checkpoints").glob("checkpoint-*")) if (run_dir / "train").is_dir() else []
    return {"manifest": m, "last": steps[-1] if steps else None, "events": events[-20:],
            "checkpoints": [c.name for c in ckpts]}


def _confusion(block: dict | None) -> dict | None:
    if not isinstance(block, dict) or not block.get("classes"):
        return None
    matrix = block.get("matrix") or []
    top = max([max(row) for row in matrix if row] + [1])
    return {"classes": block["classes"], "rows": [[{"n": v, "alpha": 0.08 + 0.85 * v / top if v else 0} for v in row]
                                                  for row in matrix]}


def _side_by_side(path: Path) -> list[dict]:
    rows: dict[str, dict] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("task") != "generation":
                    continue
                row = rows.setdefault(str(rec.get("id")), {"id": rec.get("id"), "prompt": rec.get("prompt"),
                                                           "reference": rec.get("reference"), "models": {}})
                row["models"][rec.get("model")] = rec.get("prediction")
                if len(rows) > SIDE_BY_SIDE:
                    rows.pop(str(rec.get("id")))
                    break
    except (OSError, ValueError):
        pass
    return list(rows.values())


def eval_view(run_dir: Path, m: dict | None) -> dict | None:
    if m is None:
        return None
    ev = read_json(run_dir / "eval" / (m.get("eval_json") or "eval.json")) or {}
    before, after = m.get("before") or ev.get("before") or {}, m.get("after") or ev.get("after") or {}
    metrics = [k for k in dict.fromkeys([*before, *after]) if isinstance(before.get(k, after.get(k)), int | float)]
    models = ev.get("models") or {}
    gen = _side_by_side(run_dir / "eval" / (m.get("predictions") or "predictions.jsonl"))
    columns = list(dict.fromkeys(k for r in gen for k in r["models"]))
    return {"n": m.get("n") or ev.get("n"), "headline": ev.get("headline") or m.get("headline"),
            "metrics": [{"name": k, "before": before.get(k), "after": after.get(k)} for k in metrics],
            "confusion": {name: c for name in models if (c := _confusion((models[name] or {}).get("confusion")))},
            "generations": gen, "columns": columns,
            "report_html": f"eval/{m['report_html']}" if m.get("report_html") else None}


def _dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def export_view(run_dir: Path, m: dict | None) -> dict | None:
    if m is None:
        return None
    d = run_dir / "export"
    arts = []
    for v in m.get("variants") or []:
        p = d / str(v.get("path") or v.get("name"))
        arts.append({"name": v.get("name"), "format": v.get("format"), "dtype": v.get("dtype"),
                     "engine": v.get("engine"), "path": f"export/{v.get('path') or v.get('name')}",
                     "size": v.get("dir_bytes") or v.get("size_bytes") or (_dir_size(p) if p.exists() else None),
                     "exists": p.exists()})
    qr = m.get("quant_report") or {}
    qjson = read_json(d / qr["json"]) if isinstance(qr, dict) and qr.get("json") else None
    return {"merged": m.get("merged"), "dtype": m.get("dtype"), "max_abs_diff": m.get("max_abs_diff"),
            "artefacts": arts, "quant": (qjson or qr or {}).get("rows") or [],
            "quant_meta": {k: (qjson or {}).get(k) for k in ("samples", "new_tokens", "threads", "hardware", "clock")},
            "quant_png": f"export/{qr['png']}" if isinstance(qr, dict) and qr.get("png") and (d / qr["png"]).is_file() else None}


def run_view(run_dir: Path) -> dict[str, Any]:
    """Everything the run page shows."""
    mans = manifests(run_dir)
    cfg_file, cfg = config_text(run_dir)
    return {"plan": plan_view(run_dir, mans.get("plan")), "data": data_view(run_dir, mans.get("data")),
            "train": train_view(run_dir, mans.get("train")), "eval": eval_view(run_dir, mans.get("eval")),
            "export": export_view(run_dir, mans.get("export")), "serve": mans.get("serve"),
            "config_file": cfg_file, "config": cfg, "manifests": mans,
            "job_log": _tail(run_dir / "ui" / "job.log")}


def _tail(p: Path, n: int = 4000) -> str | None:
    text = _read_text(p)
    return text[-n:] if text else None


def compare_view(run_dirs: list[Path]) -> dict[str, Any]:
    """Metric table (each run's fine-tuned metrics and training summary) and config diffs against the first run."""
    rows: dict[str, dict[str, Any]] = {}
    configs = []
    for rd in run_dirs:
        mans = manifests(rd)
        after = (mans.get("eval") or {}).get("after") or {}
        tr = mans.get("train") or {}
        vals = {f"eval {k}": v for k, v in after.items() if isinstance(v, int | float)}
        vals.update({"train loss first": tr.get("loss_first"), "train loss last": tr.get("loss_last"),
                     "steps": tr.get("steps"), "tokens/s": tr.get("tokens_per_s")})
        for k, v in vals.items():
            rows.setdefault(k, {})[rd.name] = v
        configs.append((rd.name, config_text(rd)[1] or ""))
    diffs = []
    base_name, base_text = configs[0] if configs else ("", "")
    for name, text in configs[1:]:
        diff = list(difflib.unified_diff(base_text.splitlines(), text.splitlines(), fromfile=base_name, tofile=name,
                                         lineterm="", n=1))
        diffs.append({"name": name, "lines": diff})
    return {"metrics": [{"name": k, "by_run": v} for k, v in rows.items() if any(x is not None for x in v.values())],
            "diffs": diffs, "runs": [rd.name for rd in run_dirs]}
