"""`resolution:` section — written by `dsft.config.resolve`: which preset filled which key, and why."""

from __future__ import annotations

from pydantic import Field

from dsft.config.base import Section


class Resolution(Section):
    """The record resolution leaves in the config (and in `<run_dir>/resolved_config.yaml`)."""

    preset: str
    """Size class whose values filled the keys the config left unset (see dsft.config.presets.PRESETS)."""
    why: str
    """Why this class: the model's parameter count and whether it is random-init or pretrained."""
    model: str
    """model.name_or_path the class was chosen for; resolving again for another model re-derives preset values."""
    model_params: int | None = None
    random_init: bool = False
    sources: dict[str, str] = Field(default_factory=dict)
    """Dotted key → where its value came from: `config`, `preset <name>`, or the rule that set it."""
