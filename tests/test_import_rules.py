"""The house rules on imports (docs/ARCHITECTURE.md), checked by walking every module's imports with `ast`.

- A stage folder imports only the shared rooms below it, itself, and the cross-stage edges listed in ALLOWED_EDGES
  (each to one public module of the other stage); the shared rooms never import a stage.
- Only `cli.py` modules (and the top-level CLI) import the CLI helpers; nothing imports `dsft.cli` itself.
- No module imports another module's private name (`from x import _y`).
- No import cycle between stage folders.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dsft"
STAGES = ("plan", "data", "train", "eval", "export", "serve", "deploy", "ui")
SHARED = ("config", "model", "report", "run", "records", "errors", "rewards")
# the only imports from one stage into another, each naming the public module it may use, and why
ALLOWED_EDGES = {
    ("train", "dsft.plan.api"): "train resolves `per_device_train_batch_size: auto` with the planner, and the "
                                "planner's measurements (train/measure.py) use its request type and estimate",
    ("train", "dsft.eval.during_training"): "evaluation during training uses eval's public hook",
}
TOP_LEVEL_DRIVERS = ("pipeline", "cli", "cli_common", "cli_demo", "cli_run", "__main__")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dsft" else None


def _violations() -> list[str]:
    bad = []
    for name, path in _modules():
        own = _room(name)
        leaf = name.rpartition(".")[2]
        for target, names, line in _imports(name, path):
            if not target.startswith("dsft"):
                continue
            where = f"{path.relative_to(SRC.parent)}:{line}"
            room = _room(target)
            for n in names:  # private names across modules (a module's own package re-exports are fine)
                full = f"{target}.{n}"
                if n.startswith("_") and not n.startswith("__") and full != name and target != name:
                    bad.append(f"{where}: imports private name {n} from {target}")
            if room in ("cli", "cli_demo", "cli_run") and own not in TOP_LEVEL_DRIVERS:
                bad.append(f"{where}: imports the CLI ({target})")
            if room == "cli_common" and leaf != "cli" and own not in TOP_LEVEL_DRIVERS:
                bad.append(f"{where}: only cli.py modules may import dsft.cli_common")
            if own in SHARED and room in STAGES:
                bad.append(f"{where}: shared room {own} imports stage {room}")
            if own in STAGES and room in STAGES and room != own:
                modules = [target] + [f"{target}.{n}" for n in names]
                if not any((own, m) in ALLOWED_EDGES for m in modules):
                    bad.append(f"{where}: stage {own} imports {target} (not in ALLOWED_EDGES)")
    return bad


def test_no_forbidden_imports() -> None:
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_allowed_edges_have_no_cycle_and_exist() -> None:
    graph: dict[str, set[str]] = {}
    for (src, target) in ALLOWED_EDGES:
        graph.setdefault(src, set()).add(_room(target))
        assert (SRC.parent / (target.replace(".", "/") + ".py")).exists() or \
            (SRC.parent / target.replace(".", "/") / "__init__.py").exists(), f"{target} does not exist"

    def reach(a: str, seen: set[str]) -> set[str]:
        for b in graph.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    for stage in graph:
        assert stage not in reach(stage, set()), f"import cycle through {stage}"


def test_every_stage_has_the_one_shape() -> None:
    for stage in ("plan", "data", "train", "eval", "export", "serve"):
        folder = SRC / stage
        assert (folder / "stage.py").exists(), f"{stage}/stage.py missing"
        assert (folder / "cli.py").exists(), f"{stage}/cli.py missing"
        tree = ast.parse((folder / "stage.py").read_text(encoding="utf-8"))
        fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "run" in fns, f"{stage}/stage.py has no run()"
        args = [a.arg for a in fns["run"].args.args]
        assert args[:2] == ["cfg", "run_dir"], f"{stage}/stage.py: run{tuple(args)}"


def test_the_rule_catches_a_violation(tmp_path, monkeypatch) -> None:
    """The checker itself: a planted cross-stage private import is reported."""
    fake = tmp_path / "dsft"
    for d in ("eval", "export"):
        (fake / d).mkdir(parents=True)
        (fake / d / "__init__.py").write_text('"""x"""\n')
    (fake / "__init__.py").write_text('"""x"""\n')
    (fake / "eval" / "stage.py").write_text("from dsft.export.quant import _load\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    bad = _violations()
    assert any("private name _load" in b for b in bad) and any("stage eval imports" in b for b in bad)
