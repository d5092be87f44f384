"""Accelerators the planner knows (memory as nvidia-smi reports it, dense bf16 peak TFLOPS), or a bare memory size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsft.errors import ConfigError

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float | None  # dense peak; None for a bare memory size
    cuda: bool = True
    hbm_gb_s: float | None = None  # memory bandwidth (vendor peak, GB/s): GRPO's decode time; None: unknown

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


# Memory: total MiB that nvidia-smi shows; TFLOPS: vendor dense BF16/FP16 tensor-core peak (FP32 accumulate);
# bandwidth: vendor HBM/GDDR peak (SXM parts for A100/H100/H200).
GPUS: dict[str, Gpu] = {g.name: g for g in [
    Gpu("A100-40GB", 40960 * MiB, 312.0, hbm_gb_s=1555.0),
    Gpu("A100-80GB", 81920 * MiB, 312.0, hbm_gb_s=2039.0),
    Gpu("H100-80GB", 81559 * MiB, 989.0, hbm_gb_s=3350.0),
    Gpu("H200-141GB", 143771 * MiB, 989.0, hbm_gb_s=4800.0),
    Gpu("L40S-48GB", 46068 * MiB, 362.0, hbm_gb_s=864.0),
    Gpu("RTX4090-24GB", 24564 * MiB, 165.0, hbm_gb_s=1008.0),
    Gpu("RTX3090-24GB", 24576 * MiB, 71.0, hbm_gb_s=936.0),
]}
_ALIASES = {
    "a100": "A100-80GB", "a10040": "A100-40GB", "a10040gb": "A100-40GB", "a10080": "A100-80GB", "a10080gb": "A100-80GB",
    "h100": "H100-80GB", "h10080gb": "H100-80GB", "h10080": "H100-80GB", "h100sxm": "H100-80GB",
    "h200": "H200-141GB", "h200141gb": "H200-141GB", "h200141": "H200-141GB",
    "l40s": "L40S-48GB", "l40s48gb": "L40S-48GB", "l40s48": "L40S-48GB",
    "4090": "RTX4090-24GB", "rtx4090": "RTX4090-24GB", "rtx409024gb": "RTX4090-24GB", "409024gb": "RTX4090-24GB",
    "3090": "RTX3090-24GB", "rtx3090": "RTX3090-24GB", "rtx309024gb": "RTX3090-24GB", "309024gb": "RTX3090-24GB",
}
# Order used when searching the smallest hardware that fits (cheapest memory first).
SEARCH_ORDER = ["RTX4090-24GB", "A100-40GB", "L40S-48GB", "A100-80GB", "H100-80GB", "H200-141GB"]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)\s*$", re.I)


def accepted_gpus() -> str:
    return ", ".join(GPUS) + " (or short names like A100-40, H100, 4090), or a memory size such as 24GB"


def parse_gpu(text: str) -> Gpu:
    """A known GPU name/alias, or a memory size like `24GB` / `80GiB` / `40960MiB` (no FLOPS known)."""
    raw = (text or "").strip()
    key = re.sub(r"[\s_\-]", "", raw.lower()).replace("nvidia", "").replace("geforce", "")
    for name in GPUS:
        if re.sub(r"[\s_\-]", "", name.lower()) == key:
            return GPUS[name]
    if key in _ALIASES:
        return GPUS[_ALIASES[key]]
    m = _SIZE.match(raw)
    if m:
        value, unit = float(m.group(1)), m.group(2).lower()
        mult = {"g": GiB, "gb": GiB, "gib": GiB, "m": MiB, "mb": MiB, "mib": MiB, "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB}[unit]
        if value <= 0:
            raise ConfigError(f"--gpu {text!r}: memory size must be positive (accepted: {accepted_gpus()})")
        return Gpu(f"{value:g}GB", int(value * mult), None)
    raise ConfigError(f"unknown GPU {text!r} (accepted: {accepted_gpus()})")


def cpu_device() -> Gpu:
    """The host as a training device: physical memory, no CUDA context overhead."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * GiB
    return Gpu("CPU", int(total), None, cuda=False)
