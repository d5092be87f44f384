"""Defaults resolved once: the user's config + the model's size class → a config with every value concrete.

`resolve_config(cfg, model_info)` fills each key the config leaves unset (None / `auto` / absent) from ONE preset
table (`dsft.config.presets.PRESETS`) and a few stated rules, records where every value came from in
`cfg.resolution`, and refuses keys that would be accepted but silently do nothing. It is idempotent: resolving a
resolved config changes nothing; resolving it for another model re-derives only what came from the preset.
`resolve_and_record` also writes `<run_dir>/resolved_config.yaml` and prints the preset line once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dsft.config.presets import (
    ADAM_BETA2_ADAPTER,
    ADAM_BETA2_FULL,
    EVAL_SPLIT_CARVED,
    Preset,
    preset_for,
)
from dsft.config.resolution import Resolution
from dsft.config.seed import quote
from dsft.errors import ConfigError

if TYPE_CHECKING:
    from dsft.config import Config

ADAPTER_METHODS = ("lora", "dora", "qlora")
CONFIG = "config"


class ModelFacts(Protocol):
    """What resolution reads about the model (dsft.model.info.ModelInfo provides it)."""

    params: int | None
    params_source: str
    random_init: bool
    random_init_why: str
    fully_trainable: tuple[str, ...]


class _Keys:
    """Which keys the user set (kept) and which resolution derives (recomputed every time, so it is idempotent)."""

    def __init__(self, cfg: Config):
        old = cfg.resolution.sources if cfg.resolution else {}
        self.derived = {k for k, v in old.items() if v != CONFIG}
        self.sources: dict[str, str] = {}

    def user_set(self, section: Any, dotted: str) -> bool:
        key = dotted.rsplit(".", 1)[-1]
        return key in section.model_fields_set and dotted not in self.derived and getattr(section, key) is not None

    def fill(self, section: Any, dotted: str, value: Any, why: str) -> Any:
        """Keep the user's value (source `config`) or set `value` (source `why`); return the value in effect."""
        key = dotted.rsplit(".", 1)[-1]
        if self.user_set(section, dotted) and getattr(section, key) != "auto":
            self.sources[dotted] = CONFIG
            return getattr(section, key)
        setattr(section, key, value)
        self.sources[dotted] = why
        return value


def resolve_config(cfg: Config, model_info: ModelFacts) -> Config:
    """A copy of `cfg` with every preset-dependent value concrete and `resolution` recording why (idempotent)."""
    out = cfg.model_copy(deep=True)
    preset = preset_for(model_info.params, random_init=model_info.random_init)
    keys = _Keys(cfg)
    tag = f"preset {preset.name}"
    t, lo = out.train, out.lora
    keys.fill(t, "train.learning_rate", preset.learning_rate, tag)
    keys.fill(t, "train.num_train_epochs", preset.epochs, tag)
    r = keys.fill(lo, "lora.r", preset.lora_r, tag)
    keys.fill(lo, "lora.alpha", 2.0 * r, "rule: 2 × lora.r")
    full = t.method in ("full", "freeze", "esft")
    keys.fill(t, "train.adam_beta2", ADAM_BETA2_FULL if full else ADAM_BETA2_ADAPTER,
              f"rule: {'0.95 for full/freeze/esft fine-tuning' if full else '0.999 for adapters'}")
    _fill_modules_to_save(out, keys, preset, model_info)
    _fill_batch(out, keys, preset)
    _fill_eval_split(out, keys)
    _refuse_silent_keys(out, keys)
    out.resolution = Resolution(preset=preset.name, why=_why(preset, model_info), model=out.model.name_or_path,
                                model_params=model_info.params, random_init=model_info.random_init,
                                sources=keys.sources)
    return out


def fmt_params(n: float) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def _why(preset: Preset, info: ModelFacts) -> str:
    size = f"{fmt_params(info.params)} parameters" if info.params is not None else "parameter count unknown"
    bound = "no smaller class" if preset.max_params == float("inf") else f"< {preset.max_params / 1e9:g} B"
    if info.params is None:
        bound = "the most conservative class"
    kind = "random-init" if info.random_init else "pretrained"
    return f"{kind} model ({info.random_init_why}), {size} ({info.params_source}), {bound}: {preset.source}"


def _fill_modules_to_save(out: Config, keys: _Keys, preset: Preset, info: ModelFacts) -> None:
    small = info.params is not None and info.params < preset.full_train_below
    if out.train.method in ADAPTER_METHODS and small:
        keys.fill(out.lora, "lora.modules_to_save", list(info.fully_trainable),
                  f"{'preset ' + preset.name}: embeddings, LM head and norms train fully below "
                  f"{preset.full_train_below / 1e6:g} M parameters")
    else:
        keys.fill(out.lora, "lora.modules_to_save", [], f"preset {preset.name}: only the adapter trains")


def _fill_batch(out: Config, keys: _Keys, preset: Preset) -> None:
    """Effective batch = micro-batch × accumulation; the preset's batch when the config sets no micro-batch."""
    t, p = out.train, out.plan
    accum = t.gradient_accumulation_steps
    if keys.user_set(t, "train.per_device_train_batch_size"):
        keys.sources["train.per_device_train_batch_size"] = CONFIG
        if t.per_device_train_batch_size != "auto":
            return
    elif not preset.auto_micro_batch:
        keys.fill(t, "train.per_device_train_batch_size", preset.batch,
                  f"preset {preset.name}: micro-batch = the preset's batch {preset.batch} per accumulation step")
        return
    else:
        keys.fill(t, "train.per_device_train_batch_size", "auto",
                  f"preset {preset.name}: auto — the planner picks the largest micro-batch that fits")
    if keys.user_set(p, "plan.effective_batch_size") and "gradient_accumulation_steps" in t.model_fields_set \
            and accum != 1:
        raise ConfigError(f"train.gradient_accumulation_steps {accum} has no effect with per_device_train_batch_size "
                          f"auto and plan.effective_batch_size {p.effective_batch_size} set: keep one")
    keys.fill(p, "plan.effective_batch_size", preset.batch * accum,
              f"preset {preset.name}: batch {preset.batch} × train.gradient_accumulation_steps {accum}")


def _fill_eval_split(out: Config, keys: _Keys) -> None:
    """Evaluation during training needs an eval split: carve one (stated) or refuse an explicit 0."""
    t, d = out.train, out.data
    wants = t.evaluation_strategy != "no"
    if keys.user_set(d, "data.eval_size"):
        keys.sources["data.eval_size"] = CONFIG
        if wants and d.eval_size == 0:
            raise ConfigError(f"data.eval_size is 0 but train.evaluation_strategy {t.evaluation_strategy} evaluates "
                              f"during training: set data.eval_size > 0 (e.g. {EVAL_SPLIT_CARVED}) or "
                              f"train.evaluation_strategy: no")
        return
    if not wants:  # (0 unless carved earlier for an evaluation that is now off)
        keys.fill(d, "data.eval_size", 0.0, "default: no evaluation during training")
        return
    keys.fill(d, "data.eval_size", EVAL_SPLIT_CARVED,
              f"carved: train.evaluation_strategy {t.evaluation_strategy} needs an eval split; "
              f"{EVAL_SPLIT_CARVED:.0%} of the records, stratified by label, seed data.seed")
    if d.test_size + d.eval_size >= 1:
        raise ConfigError(f"data.test_size {d.test_size} + data.eval_size {d.eval_size}: expected shares that sum below 1")


def _default(section: Any, key: str) -> Any:
    f = type(section).model_fields[key]
    return f.default_factory() if f.default_factory is not None else f.default


def _changed(section: Any, key: str) -> bool:
    return getattr(section, key) != _default(section, key)


def _refuse_silent_keys(out: Config, keys: _Keys) -> None:
    """Keys that would be accepted and then do nothing: one line naming the key and what it needs."""
    t, lo = out.train, out.lora
    rules: list[tuple[bool, str]] = [
        (_changed(t, "eval_steps") and t.evaluation_strategy != "steps",
         f"train.eval_steps {t.eval_steps} only applies with train.evaluation_strategy: steps "
         f"(it is {t.evaluation_strategy})"),
        (t.early_stopping_patience is not None and t.evaluation_strategy == "no",
         "train.early_stopping_patience needs evaluation during training: set train.evaluation_strategy: steps "
         "(or epoch)"),
        (_changed(t, "early_stopping_delta") and t.early_stopping_patience is None,
         f"train.early_stopping_delta {t.early_stopping_delta} has no effect without "
         f"train.early_stopping_patience"),
        (_changed(out.eval, "during_training_metric") and t.evaluation_strategy == "no",
         f"eval.during_training_metric {quote(out.eval.during_training_metric)} has no effect with "
         f"train.evaluation_strategy: no"),
        (_changed(t, "warmup_ratio") and t.warmup_steps > 0,
         f"train.warmup_ratio {t.warmup_ratio} has no effect with train.warmup_steps {t.warmup_steps}: keep one"),
        (t.logging_dir is not None and "tensorboard" not in t.report_to,
         f"train.logging_dir is the TensorBoard folder, but train.report_to is {t.report_to}"),
    ]
    if t.method not in ADAPTER_METHODS:
        for key in ("r", "alpha"):
            rules.append((keys.sources.get(f"lora.{key}") == CONFIG,
                          f"lora.{key} has no effect with train.method {t.method}"))
        for key in ("dropout", "target_modules", "use_rslora", "use_dora"):
            rules.append((_changed(lo, key), f"lora.{key} has no effect with train.method {t.method}"))
    if t.method != "esft":
        for key in type(out.esft).model_fields:
            rules.append((getattr(out.esft, key) != getattr(type(out.esft)(), key),
                          f"esft.{key} has no effect with train.method {t.method}"))
    for bad, message in rules:
        if bad:
            raise ConfigError(message)


def summary(cfg: Config) -> str:
    """The one line printed when a run's config is resolved: preset, why, and the values it gave."""
    res = cfg.resolution
    if res is None:
        return "config not resolved"
    t = cfg.train
    micro = t.per_device_train_batch_size
    batch = (f"effective batch {cfg.plan.effective_batch_size} (micro-batch auto from the planner)" if micro == "auto"
             else f"effective batch {micro * t.gradient_accumulation_steps} = {micro} × {t.gradient_accumulation_steps}")
    parts = [f"lr {t.learning_rate:g}"]
    if t.method in ADAPTER_METHODS:
        mts = ", ".join(cfg.lora.modules_to_save) if cfg.lora.modules_to_save else "none"
        parts.append(f"LoRA r {cfg.lora.r} alpha {cfg.lora.alpha:g}, fully trained: {mts}")
    else:
        parts.append(f"AdamW β2 {t.adam_beta2}")
    parts += [batch, f"{t.max_steps} steps (train.max_steps)" if t.max_steps else f"{t.num_train_epochs:g} epochs"]
    if res.sources.get("data.eval_size", CONFIG) != CONFIG and cfg.data.eval_size:
        parts.append(f"eval split {cfg.data.eval_size:.0%} carved for evaluation_strategy {t.evaluation_strategy}")
    return f"dsft: preset {res.preset} — {res.why}; " + ", ".join(parts)


def dump_yaml(cfg: Config) -> str:
    """resolved_config.yaml: the whole config, loadable again with `dsft … CONFIG` (it resolves to itself)."""
    import yaml

    head = ("# The fully resolved config of this run (dsft.config.resolve): every value concrete; `resolution`\n"
            "# says which preset filled which key and why. Load it like any config to repeat the run.\n")
    return head + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)


def resolve_and_record(cfg: Config, run_root: str | Path, model_info: ModelFacts, *,
                       echo: Callable[[str], None] | None = None) -> Config:
    """Resolve, write `<run_root>/resolved_config.yaml`, and print the preset line when newly resolved."""
    from dsft.run import atomic_write_text

    fresh = cfg.resolution is None or cfg.resolution.model != cfg.model.name_or_path
    out = resolve_config(cfg, model_info)
    atomic_write_text(Path(run_root) / "resolved_config.yaml", dump_yaml(out))
    if fresh:
        (echo or (lambda s: print(s, flush=True)))(summary(out))
    return out
