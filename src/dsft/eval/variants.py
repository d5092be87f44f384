"""After the export stage: load each variant once, measure it for the quantization report and score it like the
fine-tuned model (eval.variants), from the same loaded model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import DataError, DsftError
from dsft.run import RunDir, read_jsonl

log = logging.getLogger("dsft.eval")


def held_out_records(run: RunDir, limit: int) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
    """The first `limit` records (with messages) of the data stage's test split, else its eval split, and its labels."""
    if not run.has("data"):
        return None, None
    m = run.read_manifest("data")
    labels = [str(x) for x in (m.get("labels") or [])] or None
    for key in ("test", "eval"):
        rel = m.get(key)
        p = (Path(rel) if Path(rel).is_absolute() else run.root / "data" / rel) if rel else None
        if p is not None and p.exists():
            rows = [r for r in read_jsonl(p) if r.get("messages")][:limit]
            if rows:
                return rows, labels
    return None, labels


def quant_report_for(cfg: Config, export_dir: Path, merged: str, records, labels):
    """A QuantReport on the export's own tokenizer (the one saved beside the merged weights)."""
    from dsft.eval.quant_report import QuantReport
    from dsft.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(export_dir / merged), trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    return QuantReport(cfg, tok, records, labels)


def variant_path(export_dir: Path, v: dict[str, Any]) -> Path | None:
    """Where a variant row of the export manifest points (absolute or relative to the export folder)."""
    rel = v.get("path") or v.get("dir")
    if not rel:
        return None
    return Path(rel) if Path(rel).is_absolute() else export_dir / rel


def load_variant(path: Path, v: dict[str, Any], cfg: Config):
    """The PyTorch model of a variant as stored (its dtype for plain folders), or None for GGUF (llama.cpp only)."""
    from dsft.model.artefacts import artefact_kind, load_torch_artefact

    if artefact_kind(path) == "gguf":
        return None
    return load_torch_artefact(path, dtype=v.get("dtype") or cfg.export.dtype, trust_remote_code=cfg.model.trust_remote_code)


def measure_variants(cfg: Config, export_dir: Path, variants: list[dict[str, Any]], *, report=None,
                     score=None, wanted=lambda name: True) -> list[str]:
    """Every variant once: a quant-report row (when `report`), then `score(name, model)` for the wanted ones.

    `score(name, model, path)` scores a loaded PyTorch model for the eval tables; it is skipped for GGUF. A variant that cannot be
    loaded fails the quantization report (one line), else it is skipped with a warning. Returns the names scored.
    """
    scored = []
    for v in variants:
        if not isinstance(v, dict) or not v.get("name"):
            continue
        name, path = str(v["name"]), variant_path(export_dir, v)
        do_score = score is not None and wanted(name)
        if path is None or not (report is not None or do_score):
            continue
        try:
            model = load_variant(path, v, cfg)
        except DsftError as err:
            if report is not None:
                raise
            log.warning("eval: skipping export variant %s (%s)", name, err)
            continue
        if report is not None:
            report.add(v, report.runner(v, path, model))
        if do_score and model is not None:
            score(name, model, path)
            scored.append(name)
        elif do_score:
            log.info("eval: export variant %s (GGUF) is measured in the quantization report only", name)
        del model
    return scored


def measure_export(cfg: Config, export_dir: str | Path, *, records: list[dict[str, Any]] | None = None,
                   labels: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The quantization report of an export folder (its manifest.json lists the variants), without a run directory:
    quant_report.* into out_dir (default: the export folder) → {json, md, png, rows}. No records: built-in probes."""
    import json

    export_dir = Path(export_dir)
    mp = export_dir / "manifest.json"
    if not mp.exists():
        raise DataError(f"{export_dir}: no manifest.json; expected a folder written by `dsft export --model … -o DIR`")
    exp = json.loads(mp.read_text(encoding="utf-8"))
    report = quant_report_for(cfg, export_dir, exp.get("merged") or "merged", records, labels)
    measure_variants(cfg, export_dir, exp.get("variants") or [], report=report)
    return report.write(Path(out_dir or export_dir), exp.get("dtype") or cfg.export.dtype)
