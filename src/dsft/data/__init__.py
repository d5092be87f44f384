"""Stage 'data' of dsft: read any SFT format, clean, dedup, split; `prepare(cfg, run, force)` is the entry point."""

from dsft.data.prepare import prepare

__all__ = ["prepare"]
