"""The new-run form and the YAML editor, validated by the same pydantic schema as the CLI (errors per field / line)."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dsft.config import Config, load_config
from dsft.errors import DsftError
from dsft.ui.paths import RUN_NAME

EMBEDDED_PREFIX = "embedded:"

# (config key, label, input kind, help) — the form's fields are config keys, so schema errors land next to them
FORM_FIELDS: list[tuple[str, str, str, str]] = [
    ("model.name_or_path", "Model", "text", "a local Hugging Face model folder, or embedded:tiny-deepseek-v3"),
    ("data.path", "Data file", "text", "CSV/TSV/JSON/JSONL/Parquet/text, or embedded:medical"),
    ("train.method", "Method", "select:lora,dora,qlora,full,freeze", ""),
    ("train.learning_rate", "Learning rate", "text", "empty: the preset for the model size"),
    ("train.num_train_epochs", "Epochs", "text", "empty: the preset (3 for tiny models)"),
    ("train.max_steps", "Max steps", "text", "empty: run the epochs"),
    ("train.per_device_train_batch_size", "Micro-batch", "text", "a number or auto (the planner's largest)"),
    ("train.gradient_accumulation_steps", "Gradient accumulation", "text", ""),
    ("lora.r", "LoRA rank", "text", "empty: the preset"),
    ("data.max_seq_length", "Max sequence length", "text", "tokens"),
    ("data.max_samples", "Max input records", "text", "empty: all"),
    ("train.save_steps", "Checkpoint every", "text", "steps (stop + resume continue from the newest checkpoint)"),
    ("eval.max_samples", "Eval records", "text", "held-out records scored before and after"),
]
FIELD_KEYS = [f[0] for f in FORM_FIELDS]


def base_config() -> dict[str, Any]:
    """The embedded demo config (what `dsft demo --print-config` shows): the form's starting point."""
    text = resources.files("dsft").joinpath("assets/demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def get_dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    if value is None:
        d.pop(parts[-1], None)
    else:
        d[parts[-1]] = value


def form_defaults() -> dict[str, str]:
    """Each field's initial text: the demo config's value, or empty for the schema's default."""
    base = base_config()
    out = {}
    for key in FIELD_KEYS:
        v = get_dotted(base, key)
        out[key] = "" if v is None else str(v)
    out["model.name_or_path"] = out["model.name_or_path"] or "embedded:tiny-deepseek-v3"
    return out


def _error_key(loc: tuple, keys: list[str]) -> str:
    """The longest form key that the error location starts with (unions add their member to the location)."""
    dotted = ".".join(str(p) for p in loc)
    best = ""
    for k in keys:
        if (dotted == k or dotted.startswith(k + ".")) and len(k) > len(best):
            best = k
    return best or dotted or "<root>"


def _message(e: dict) -> str:
    got = e.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    return f"{e['msg']}{got_s}"


def schema_errors(raw: dict, keys: list[str]) -> dict[str, str]:
    """{key: message} for every schema error of a raw config mapping (first message per key)."""
    try:
        Config.model_validate(raw)
    except ValidationError as err:
        out: dict[str, str] = {}
        for e in err.errors():
            out.setdefault(_error_key(e["loc"], keys), _message(e))
        return out
    return {}


def check_paths(raw: dict) -> dict[str, str]:
    """Files the user names must exist (the dashboard reads no other path); remote code stays off from the browser."""
    errors: dict[str, str] = {}
    model = get_dotted(raw, "model.name_or_path")
    if isinstance(model, str) and not model.startswith(EMBEDDED_PREFIX):
        p = Path(model).expanduser()
        if not p.is_dir() or not (p / "config.json").is_file():
            errors["model.name_or_path"] = f"{model}: not a local model folder with config.json (or use embedded:tiny-deepseek-v3)"
    data = get_dotted(raw, "data.path")
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, str) and not item.startswith(EMBEDDED_PREFIX) and not Path(item).expanduser().is_file():
            errors["data.path"] = f"{item}: no such file"
    if get_dotted(raw, "model.trust_remote_code"):
        errors["model.trust_remote_code"] = "not accepted from the dashboard (it runs code from the model folder): use the CLI"
    logging_dir = get_dotted(raw, "train.logging_dir")
    if logging_dir and Path(logging_dir).is_absolute():
        errors["train.logging_dir"] = "must be relative (inside the run directory) when launched from the dashboard"
    return errors


def check_name(name: Any, runs_root: Path) -> str | None:
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        return "1-64 letters, digits, '.', '_' or '-'"
    if (runs_root / name).exists():
        return f"a run named {name!r} exists already"
    return None


def config_from_form(form: dict[str, Any]) -> tuple[dict, dict[str, str]]:
    """(raw config, {field: error}) from the form's texts over the demo config; empty fields take the schema default."""
    raw = base_config()
    for key in FIELD_KEYS:
        v = form.get(key)
        v = v.strip() if isinstance(v, str) else v
        set_dotted(raw, key, None if v in ("", None) else v)
    errors = schema_errors(raw, FIELD_KEYS)
    errors.update({k: m for k, m in check_paths(raw).items() if k not in errors})
    if not errors:  # write the schema's typed values ("3e-4" → 0.0003), so the YAML reads as the user meant
        cfg = Config.model_validate(raw)
        for key in FIELD_KEYS:
            if get_dotted(raw, key) is not None:
                obj: Any = cfg
                for part in key.split("."):
                    obj = getattr(obj, part)
                set_dotted(raw, key, obj)
    return raw, errors


def _line_of(node: Any, loc: tuple) -> int | None:
    """1-based line of the deepest key of `loc` found in the composed YAML tree."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def validate_yaml(text: str) -> tuple[dict | None, list[dict[str, Any]]]:
    """(raw config, errors [{key, message, line}]) of the YAML editor's text, by the CLI's schema."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
        tree = yaml.compose(text) if text.strip() else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return None, [{"key": "<yaml>", "message": f"not valid YAML ({getattr(err, 'problem', err)})",
                       "line": mark.line + 1 if mark else None}]
    if not isinstance(raw, dict):
        return None, [{"key": "<root>", "message": f"expected a mapping at the top level, got {type(raw).__name__}",
                       "line": 1}]
    raw.pop("run_dir", None)  # the dashboard puts every run in its own folder of the runs directory
    if {"model_name", "training_args", "data_args"} & raw.keys():  # the seed's layout: the CLI's loader maps it
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "config.yaml"
            p.write_text(text, encoding="utf-8")
            try:
                raw = load_config(p).model_dump(mode="json", exclude={"run_dir"})
            except DsftError as err:
                return None, [{"key": "<config>", "message": str(err).replace(str(p) + ": ", ""), "line": None}]
    errors = []
    try:
        Config.model_validate(raw)
    except ValidationError as err:
        for e in err.errors():
            errors.append({"key": ".".join(str(p) for p in e["loc"]), "message": _message(e),
                           "line": _line_of(tree, e["loc"])})
    for key, msg in check_paths(raw).items():
        errors.append({"key": key, "message": msg, "line": _line_of(tree, tuple(key.split(".")))})
    return raw, errors


def to_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
