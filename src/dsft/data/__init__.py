"""Stage 'data' of dsft: read any SFT format, clean, dedup, split. `dsft.data.stage.run(cfg, run_dir, force=)`."""

from dsft.data.stage import run

prepare = run  # the name dsft.pipeline imports until it calls dsft.data.stage.run

__all__ = ["run", "prepare"]
