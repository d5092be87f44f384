"""Room boundaries of export / eval / model / report: export writes, eval measures, model loads, report renders."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "dsft"
STAGES = ("plan", "data", "train", "eval", "export", "serve", "deploy", "ui")


def _imports(folder: str) -> list[tuple[Path, str, list[str]]]:
    """(file, imported module, imported names) for every dsft import in a source folder, function bodies included."""
    out = []
    for p in sorted((SRC / folder).glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsft"):
                out.append((p, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out += [(p, a.name, []) for a in node.names if a.name.startswith("dsft")]
    return out


def test_no_import_between_export_and_eval():
    bad = [(p.name, m) for p, m, _ in _imports("export") if m.startswith("dsft.eval")]
    bad += [(p.name, m) for p, m, _ in _imports("eval") if m.startswith("dsft.export")]
    assert not bad, bad


def test_model_and_report_import_no_stage():
    for folder in ("model", "report"):
        bad = [(p.name, m) for p, m, _ in _imports(folder) if m.split(".")[1] in STAGES]
        assert not bad, (folder, bad)


def test_no_private_names_imported_across_modules():
    for folder in ("model", "export", "eval", "report"):
        bad = [(p.name, m, n) for p, m, names in _imports(folder) for n in names if n.startswith("_")]
        assert not bad, (folder, bad)


def test_loaders_live_in_model():
    """llama.cpp's low-level context and dsft's int8/int4 loader are read in dsft.model only."""
    for folder in ("export", "eval"):
        for p in (SRC / folder).glob("*.py"):
            text = p.read_text(encoding="utf-8")
            assert "._ctx" not in text and "def load_quantized" not in text and "def load_gguf" not in text, p
