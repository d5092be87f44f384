"""Re-export of the one preset table, which lives in `dsft.config.presets` (resolved by `dsft.config.resolve`)."""

from dsft.config.presets import PRESETS, Preset, preset_for, preset_named

__all__ = ["PRESETS", "Preset", "preset_for", "preset_named"]
