"""Where dsft caches things it builds or unpacks (embedded model, real tokenizers): $DSFT_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def dsft_home() -> Path:
    """The cache root: $DSFT_HOME, else ~/.cache/dsft."""
    root = Path(os.environ.get("DSFT_HOME") or Path.home() / ".cache" / "dsft")
    root.mkdir(parents=True, exist_ok=True)
    return root


def assets_dir() -> Path:
    """Files shipped inside the package (data subset, tiny tokenizer)."""
    return Path(__file__).resolve().parent.parent / "assets"
