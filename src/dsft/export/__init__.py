"""Stage 'export': merge the adapter into the base, save plain-transformers folders and quantized variants."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dsft.errors import ExportError

log = logging.getLogger(__name__)

__all__ = ["export", "export_model", "dir_size", "load_quantized"]


def load_quantized(model_dir: str | Path):
    """Reload an int8/int4 variant written by dsft → (model, tokenizer) (see dsft.export.quant)."""
    from dsft.export.quant import load_quantized as _load

    return _load(model_dir)


def dir_size(path: str | Path, *, weights_only: bool = False) -> int:
    """Bytes of every file under path (a file's own size when path is a file); weights_only: *.safetensors/*.gguf."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    files = [f for f in p.rglob("*") if f.is_file()]
    if weights_only:
        files = [f for f in files if f.suffix in (".safetensors", ".gguf")]
    return sum(f.stat().st_size for f in files)


def _records_from_run(run, limit: int) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
    """The first held-out records of the data stage (test, else eval split) and its label set, if any."""
    from dsft.run import read_jsonl

    if run is None or not run.has("data"):
        return None, None
    m = run.read_manifest("data")
    labels = [str(x) for x in (m.get("labels") or [])] or None
    for key in ("test", "eval"):
        rel = m.get(key)
        if not rel:
            continue
        p = Path(rel) if Path(rel).is_absolute() else run.root / "data" / rel
        if p.exists():
            rows = [r for r in read_jsonl(p) if r.get("messages")][:limit]
            if rows:
                return rows, labels
    return None, labels


def _tokenizer_source(model_cfg, base_dir: Path, adapter_dir: Path | None, model_dir: Path | None) -> str:
    if model_cfg.tokenizer:
        return model_cfg.tokenizer
    for d in (model_dir, adapter_dir):
        if d is not None and (Path(d) / "tokenizer_config.json").exists():
            return str(d)
    return str(base_dir)


def export_model(
    base_dir: str | Path,
    out_dir: str | Path,
    cfg,
    *,
    adapter_dir: str | Path | None = None,
    conversations: list[list[dict[str, str]]] | None = None,
    records: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export a base (+ adapter) into out_dir: `merged/` and every variant in cfg.export.formats.

    `cfg` is the whole Config (model + data + export + eval sections). `records` (canonical held-out records) and
    `labels` feed the quantization report; `conversations` (default: the records' messages) the merge check.
    Returns the manifest (paths relative to out_dir).
    """
    from dsft.export.merge import check_adapter_dir, merge_and_save
    from dsft.model.load import resolve_model_dir
    from dsft.model.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    base_dir = resolve_model_dir(str(base_dir))
    ecfg = cfg.export
    unknown = [f for f in ecfg.formats if f not in KNOWN_FORMATS]
    if unknown:
        raise ExportError(f"export.formats: unknown format {unknown[0]!r} (known: {', '.join(KNOWN_FORMATS)})")
    from dsft.export.variants import check_formats_runnable

    check_formats_runnable(ecfg.formats)
    if adapter_dir is not None:
        adapter_dir = check_adapter_dir(Path(adapter_dir))
    merged_dir = out_dir / "merged"
    if merged_dir.exists() and any(merged_dir.iterdir()) and not force:
        raise ExportError(f"{merged_dir} already exists; pass --force to overwrite it")
    tok = load_tokenizer(_tokenizer_source(cfg.model, base_dir, Path(adapter_dir) if adapter_dir else None, None),
                         trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    if tok.chat_template is None:
        raise ExportError(f"{base_dir}: the tokenizer has no chat template; set model.chat_template "
                          f"(deepseek-v3, deepseek-llm, deepseek-coder, r1-distill …)")
    if conversations is None and records:
        conversations = [r["messages"] for r in records[:8]]
    t0 = time.perf_counter()
    res = merge_and_save(base_dir, merged_dir, tok=tok, adapter_dir=adapter_dir, dtype=ecfg.dtype,
                         conversations=conversations, trust_remote_code=cfg.model.trust_remote_code)
    variants: list[dict[str, Any]] = [{
        "name": "merged", "format": "safetensors", "dtype": ecfg.dtype, "path": "merged",
        "size_bytes": dir_size(merged_dir, weights_only=True), "dir_bytes": dir_size(merged_dir), "engine": "transformers", "seconds": round(time.perf_counter() - t0, 2),
    }]
    manifest = {
        "merged": "merged",
        "dtype": ecfg.dtype,
        "max_abs_diff": res["max_abs_diff"],
        "max_abs_diff_fp32_merge": res["max_abs_diff_fp32_merge"],
        "logit_scale": res["logit_scale"],
        "tolerance": res["tolerance"],
        "within_tolerance": res["within_tolerance"],
        "base_model": str(base_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "adapter_type": res["adapter_type"],
        "params": res["params"],
        "variants": variants,
    }
    for key in ("fp16_max_activation", "fp16_max_activation_at"):
        if key in res:
            manifest[key] = res[key]
    from dsft.export.variants import make_variant

    for fmt in ecfg.formats:
        if fmt == "merged":
            continue
        variants.append(make_variant(fmt, merged_dir, out_dir, tok=tok))
    if ecfg.report:
        from dsft.export.report import quant_report

        manifest["quant_report"] = quant_report(out_dir, variants, cfg, records=records, labels=labels,
                                                conversations=conversations, tok=tok)
    return manifest


KNOWN_FORMATS = ("merged", "int8", "int4", "nf4", "bnb-int8", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")


def export(cfg, run, force: bool = False) -> dict[str, Any]:
    """The export stage: read the train manifest, merge, save `merged/` (+ variants), write the manifest."""
    train_m = run.read_manifest("train")
    base = train_m.get("base_model")
    if not base:
        raise ExportError(f"{run.manifest_path('train')}: key 'base_model' missing (expected the absolute base model dir)")
    train_dir = run.root / "train"
    adapter = train_m.get("adapter")
    full = train_m.get("model")
    adapter_dir = None
    if adapter:
        adapter_dir = Path(adapter) if Path(adapter).is_absolute() else train_dir / adapter
        base_dir = Path(base)
    elif full:
        # full / freeze fine-tuning: the trained model is the "base"; nothing to merge.
        base_dir = Path(full) if Path(full).is_absolute() else train_dir / full
    else:
        raise ExportError(f"{run.manifest_path('train')}: neither 'adapter' nor 'model' is set; nothing to export")
    out = run.prepare_stage("export", force=force)
    records, labels = _records_from_run(run, max(8, cfg.export.report_samples))
    manifest = export_model(base_dir, out, cfg, adapter_dir=adapter_dir, records=records, labels=labels, force=True)
    manifest["method"] = train_m.get("method")
    manifest["base_model"] = str(base)
    run.write_manifest("export", manifest)
    log.info("export: merged %s model → %s (max |Δlogit| = %.2e)", manifest["dtype"], out / "merged",
             manifest["max_abs_diff"])
    return manifest
