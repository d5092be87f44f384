"""The export stage: read the train manifest, merge into `merged/`, write every variant in export.formats."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dsft.config import Config
from dsft.errors import ExportError
from dsft.report.progress import bar
from dsft.run import RunDir, read_jsonl

log = logging.getLogger(__name__)

PROBE_RECORDS = 8
"""Held-out conversations the merge check compares merged and adapter logits on."""


def run(cfg: Config, run_dir: RunDir, *, force: bool = False) -> dict[str, Any]:
    """The export stage of a run directory → its manifest (`merged`, `dtype`, `max_abs_diff`, `variants`, …)."""
    train_m = run_dir.read_manifest("train")
    base = train_m.get("base_model")
    if not base:
        raise ExportError(f"{run_dir.manifest_path('train')}: key 'base_model' missing (expected the absolute base model dir)")
    train_dir = run_dir.root / "train"
    adapter, full = train_m.get("adapter"), train_m.get("model")
    adapter_dir = None
    if adapter:
        adapter_dir = Path(adapter) if Path(adapter).is_absolute() else train_dir / adapter
        base_dir = Path(base)
    elif full:
        # full / freeze fine-tuning: the trained model is the "base"; nothing to merge.
        base_dir = Path(full) if Path(full).is_absolute() else train_dir / full
    else:
        raise ExportError(f"{run_dir.manifest_path('train')}: neither 'adapter' nor 'model' is set; nothing to export")
    out = run_dir.prepare_stage("export", force=force)
    manifest = export_model(base_dir, out, cfg, adapter_dir=adapter_dir, conversations=_probe_conversations(run_dir),
                            force=True)
    if train_m.get("esft_delta"):  # ESFT: ship the small expert delta next to the merged model
        from dsft.model.esft_delta import copy_delta

        manifest.update(copy_delta(train_dir / train_m["esft_delta"], out / "esft_delta"))
    manifest["method"] = train_m.get("method")
    manifest["base_model"] = str(base)
    run_dir.write_manifest("export", manifest)
    if manifest.get("merge") == "stream":
        log.info("export: stream-merged %s model → %s (%d shards)", manifest["dtype"], out / "merged",
                 manifest["stream"]["shards"])
    else:
        log.info("export: merged %s model → %s (max |Δlogit| = %.2e)", manifest["dtype"], out / "merged",
                 manifest["max_abs_diff"])
    return manifest


def _probe_conversations(run_dir: RunDir) -> list[list[dict[str, str]]] | None:
    """The first held-out conversations of the data stage (test split, else eval split), if any."""
    if not run_dir.has("data"):
        return None
    m = run_dir.read_manifest("data")
    for key in ("test", "eval"):
        rel = m.get(key)
        p = (Path(rel) if Path(rel).is_absolute() else run_dir.root / "data" / rel) if rel else None
        if p is not None and p.exists():
            convs = [r["messages"] for r in read_jsonl(p) if r.get("messages")][:PROBE_RECORDS]
            if convs:
                return convs
    return None


def _tokenizer_source(model_cfg, base_dir: Path, adapter_dir: Path | None) -> str:
    """model.tokenizer, else the adapter folder's tokenizer (saved by dsft train), else the base's."""
    if model_cfg.tokenizer:
        return model_cfg.tokenizer
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").exists():
        return str(adapter_dir)
    return str(base_dir)


def _check_request(cfg: Config, out_dir: Path, adapter_dir, force: bool) -> Path | None:
    """Refuse, before any work, unknown or unrunnable formats, a bad adapter folder and an existing export."""
    from dsft.export.variants import KNOWN_FORMATS, check_formats_runnable
    from dsft.model.adapters import check_adapter_dir

    unknown = [f for f in cfg.export.formats if f not in KNOWN_FORMATS]
    if unknown:
        raise ExportError(f"export.formats: unknown format {unknown[0]!r} (known: {', '.join(KNOWN_FORMATS)})")
    check_formats_runnable(cfg.export.formats)
    if cfg.export.dtype == "fp8" and [f for f in cfg.export.formats if f != "merged"]:
        raise ExportError(f"export.formats {cfg.export.formats}: with export.dtype fp8 only 'merged' is written "
                          f"(the other variants start from a bf16/fp16/fp32 merge)")
    adapter_dir = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    merged_dir = out_dir / "merged"
    if merged_dir.exists() and any(merged_dir.iterdir()) and not force:
        raise ExportError(f"{merged_dir} already exists; pass --force to overwrite it")
    return adapter_dir


def export_model(base_dir: str | Path, out_dir: str | Path, cfg: Config, *, adapter_dir: str | Path | None = None,
                 conversations: list[list[dict[str, str]]] | None = None, force: bool = False) -> dict[str, Any]:
    """Export a base (+ adapter) into out_dir: `merged/` and every variant in cfg.export.formats.

    `cfg` is the whole Config (model + export sections); `conversations` feed the merge check (default: built-in
    probes). Returns the manifest (paths relative to out_dir). Measuring the variants is the eval stage's job.
    """
    from dsft.export.merge import merge_and_save
    from dsft.export.stream_merge import is_stream_base
    from dsft.export.variants import dir_size, make_variant
    from dsft.model.load import resolve_model_dir
    from dsft.model.tokenizer import load_tokenizer

    out_dir, base_dir = Path(out_dir), resolve_model_dir(str(base_dir))
    ecfg = cfg.export
    adapter_dir = _check_request(cfg, out_dir, adapter_dir, force)
    tok = load_tokenizer(_tokenizer_source(cfg.model, base_dir, adapter_dir), trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    if tok.chat_template is None:
        raise ExportError(f"{base_dir}: the tokenizer has no chat template; set model.chat_template "
                          f"(deepseek-v3, deepseek-llm, deepseek-coder, r1-distill …)")
    t0 = time.perf_counter()
    merged_dir = out_dir / "merged"
    todo = [f for f in ecfg.formats if f != "merged"]
    pbar = bar("export", total=1 + len(todo), unit=" variant")
    try:
        pbar.set_postfix_str("merged", refresh=True)
        if ecfg.dtype == "fp8" or is_stream_base(base_dir):  # shard by shard, never the whole model
            manifest = _stream_export(base_dir, out_dir, adapter_dir, ecfg.dtype, tok)
            variants = manifest["variants"]
        else:
            res = merge_and_save(base_dir, merged_dir, tok=tok, adapter_dir=adapter_dir, dtype=ecfg.dtype,
                                 conversations=conversations, trust_remote_code=cfg.model.trust_remote_code)
            variants: list[dict[str, Any]] = [{
                "name": "merged", "format": "safetensors", "dtype": ecfg.dtype, "path": "merged",
                "size_bytes": dir_size(merged_dir, weights_only=True), "dir_bytes": dir_size(merged_dir), "engine": "transformers",
                "seconds": round(time.perf_counter() - t0, 2),
            }]
            manifest = {
                "merged": "merged", "dtype": ecfg.dtype, "max_abs_diff": res["max_abs_diff"],
                "max_abs_diff_fp32_merge": res["max_abs_diff_fp32_merge"], "logit_scale": res["logit_scale"],
                "tolerance": res["tolerance"], "within_tolerance": res["within_tolerance"], "base_model": str(base_dir),
                "adapter": str(adapter_dir) if adapter_dir else None, "adapter_type": res["adapter_type"],
                "params": res["params"], "variants": variants,
            }
            manifest.update({k: res[k] for k in ("fp16_max_activation", "fp16_max_activation_at") if k in res})
        pbar.update(1)
        for fmt in todo:
            pbar.set_postfix_str(fmt, refresh=True)
            variants.append(make_variant(fmt, merged_dir, out_dir, tok=tok, conversations=conversations))
            pbar.update(1)
    finally:
        pbar.close()
    return manifest


def _stream_export(base_dir: Path, out_dir: Path, adapter_dir: Path | None, dtype: str, tok) -> dict[str, Any]:
    """A sharded or FP8 base: merge shard by shard (dsft.export.stream_merge), never loading the model whole.

    No logits check here (that needs the whole model; the tests compare with PEFT's merge): the manifest carries the
    stream report instead (`stream`, and `stream_report.json` beside `merged/`).
    """
    from dsft.export.stream_merge import stream_merge
    from dsft.export.variants import dir_size
    from dsft.model.adapters import adapter_type
    from dsft.run import atomic_write_json

    if dtype == "float32":
        log.warning("export: float32 merge of a sharded/FP8 base (4 bytes/parameter); export.dtype fp8 or bfloat16 "
                    "keeps the shipped size")
    merged_dir = out_dir / "merged"
    rep = stream_merge(base_dir, merged_dir, adapter_dir=adapter_dir, out_format=dtype)
    tok.save_pretrained(str(merged_dir))
    atomic_write_json(out_dir / "stream_report.json", rep)
    variant = {"name": "merged", "format": "safetensors+fp8" if dtype == "fp8" else "safetensors", "dtype": dtype,
               "path": "merged", "size_bytes": dir_size(merged_dir, weights_only=True), "dir_bytes": dir_size(merged_dir),
               "engine": "vllm/sglang (FP8 blocks)" if dtype == "fp8" else "transformers", "seconds": rep["seconds"]}
    return {
        "merged": "merged", "dtype": dtype, "merge": "stream", "max_abs_diff": None, "max_abs_diff_fp32_merge": None,
        "logit_scale": None, "tolerance": None, "within_tolerance": None, "base_model": str(base_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "adapter_type": adapter_type(adapter_dir) if adapter_dir else None, "params": rep["params"],
        "stream": rep, "stream_report": "stream_report.json", "requant_error": rep["requant_error"],
        "variants": [variant],
    }


def export_direct(cfg: Config, model: str, out: Path, *, adapter: str | None = None, eval_data: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """`dsft export --model DIR -o OUT`: export without a run directory; OUT gets the variants and manifest.json."""
    from dsft.records import read_records_file
    from dsft.run import atomic_write_json

    if (out / "manifest.json").exists() and not force:
        raise ExportError(f"{out} already holds an export; pass --force to overwrite it")
    records = read_records_file(eval_data)[0] if eval_data else None
    conversations = [r["messages"] for r in records[:PROBE_RECORDS]] if records else None
    m = export_model(model, out, cfg, adapter_dir=adapter, conversations=conversations, force=force)
    atomic_write_json(out / "manifest.json", {"stage": "export", **m})
    return m
