"""What `dsft serve` will serve and how: --config's serve: section merged with the flags, a run's model, checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.config import ServeConfig
from dsft.errors import ServeError


def serve_section(config_path: str | None) -> dict[str, Any]:
    """The serve: section of a dsft YAML config as a dict ({} without one); a path that is no file is one line."""
    if not config_path:
        return {}
    p = Path(config_path)
    if p.is_dir():
        raise ServeError(f"--config {p}: is a directory; expected a dsft YAML file")
    from dsft.config import load_config

    return load_config(p).serve.model_dump()


def resolve(*, model: str | None, run: str | None, config: str | None, loras: list[str],
            flags: dict[str, Any]) -> tuple[str, ServeConfig]:
    """(model, ServeConfig) from --model/--run, --config's serve: section, --lora NAME=DIR and the other flags
    (flags left None keep the config's value)."""
    from pydantic import ValidationError

    base = serve_section(config)
    base.update({k: v for k, v in flags.items() if v is not None})
    adapters = dict(base.get("lora_modules") or {})
    if run:
        if model:
            raise ServeError("give either --model or --run, not both")
        model, run_adapters = model_from_run(run)
        adapters.update(run_adapters)
    elif not model and base.get("esft_delta"):
        model = esft_base(base["esft_delta"])
    elif not model:
        raise ServeError("dsft serve needs --model DIR (or --run RUN_DIR)")
    for item in loras:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--lora {item!r}: expected NAME=DIR")
        adapters[name] = path
    base["lora_modules"] = adapters
    if base.get("esft_delta"):
        check_esft(base, model)
    try:
        cfg = ServeConfig(**base)
    except ValidationError as err:
        e = err.errors()[0]
        raise ServeError(f"serve option {'.'.join(str(x) for x in e['loc'])}: {str(e['msg'])[:200]}") from err
    return model, cfg


def model_from_run(run_dir: str) -> tuple[str, dict[str, str]]:
    """(model, {adapter name: dir}) of a run: export's merged folder, else train's model or base + adapter."""
    from dsft.run import RunDir

    run = RunDir(run_dir)
    if run.has("export"):
        m = run.read_manifest("export")
        return str((run.root / "export" / m["merged"]).resolve()), {}
    if run.has("train"):
        m = run.read_manifest("train")
        if m.get("model"):
            return str((run.root / "train" / m["model"]).resolve()), {}
        if m.get("adapter"):
            name = Path(run_dir).resolve().name or "adapter"
            return str(m["base_model"]), {name: str((run.root / "train" / m["adapter"]).resolve())}
    raise ServeError(f"{run_dir}: no export or train output to serve (run `dsft export` or `dsft train` first)")


def check_adapters(adapters: dict[str, str]) -> None:
    """Each LoRA adapter is a folder with adapter_config.json and safetensors weights (pickles are refused)."""
    for name, path in adapters.items():
        d = Path(path).expanduser()
        if not (d / "adapter_config.json").is_file():
            raise ServeError(f"LoRA adapter '{name}': {d} has no adapter_config.json — expected a LoRA adapter folder")
        if not (d / "adapter_model.safetensors").is_file():
            if (d / "adapter_model.bin").exists():
                raise ServeError(f"LoRA adapter '{name}': {d} holds adapter_model.bin (a pickle, which could run code "
                                 f"when loaded); dsft serves safetensors only — re-save it with safe_serialization=True")
            raise ServeError(f"LoRA adapter '{name}': {d} has no adapter_model.safetensors")


def esft_base(delta: str) -> str:
    """The base model an ESFT delta names (its esft_delta.json)."""
    from dsft.errors import DsftError
    from dsft.model.esft_delta import read_delta_meta

    try:
        return str(read_delta_meta(delta)["base_model"])
    except DsftError as err:
        raise ServeError(f"--esft: {err}") from err


def check_esft(settings: dict[str, Any], model: str) -> None:
    """An ESFT delta is applied by the transformers engine, to the base it was trained on; name the server after it."""
    from dsft.errors import DsftError
    from dsft.model.esft_delta import check_base, read_delta_meta

    if settings.get("engine", "transformers") != "transformers":
        raise ServeError(f"--esft needs the transformers engine; for {settings['engine']}, merge first "
                         f"(`dsft esft merge DELTA -o DIR`) and serve DIR")
    from dsft.model.load import resolve_model_dir

    try:
        meta = read_delta_meta(settings["esft_delta"])
        check_base(resolve_model_dir(model), meta, f"--esft {settings['esft_delta']}")
    except DsftError as err:
        raise ServeError(str(err)) from err
    if not settings.get("served_model_name"):
        settings["served_model_name"] = f"{Path(model).name}+esft"
