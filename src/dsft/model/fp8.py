"""DeepSeek's FP8 block format: e4m3 weights with one float32 ``weight_scale_inv`` per 128×128 block.

The layout is the one DeepSeek-V3/R1 ship: ``weight`` is ``torch.float8_e4m3fn`` of the linear's shape,
``weight_scale_inv`` is float32 of shape ``(ceil(out/128), ceil(in/128))``, and the real weight is
``block × scale_inv`` (the edge block of a dim not divisible by 128 is zero-padded for its scale, then cut).
Every other room (loading, training, planning, merging) goes through these functions.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" pairs with "<name>.weight_scale_inv"


def quantization_config(block: tuple[int, int] = BLOCK) -> dict:
    """The ``quantization_config`` entry of a shipped DeepSeek-V3 ``config.json``."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [int(block[0]), int(block[1])]}


def block_size_of(config: dict) -> tuple[int, int] | None:
    """The (rows, cols) block of an FP8 ``config.json`` dict, or None when it is not an FP8 checkpoint."""
    qc = config.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "fp8":
        return None
    rows, cols = qc.get("weight_block_size") or BLOCK
    return int(rows), int(cols)


def scale_shape(shape: tuple[int, int] | torch.Size, block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` tensor for a 2-D weight of ``shape``."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` (e4m3, 2-D) × its per-block ``scale_inv``, as ``dtype``."""
    if weight.dim() != 2 or scale_inv.shape != scale_shape(weight.shape, block):
        raise ValueError(f"FP8 weight {tuple(weight.shape)} needs scale_inv {scale_shape(weight.shape, block)}, "
                         f"got {tuple(scale_inv.shape)}")
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight as (e4m3 tensor, float32 scale_inv): each block's absolute max maps to e4m3's 448."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    n_r, n_c = scale_shape(weight.shape, block)
    padded = torch.zeros(n_r * block[0], n_c * block[1], dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(n_r, block[0], n_c, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(n_r * block[0], n_c * block[1])[:rows, :cols].to(FP8_DTYPE)
    return q.contiguous(), scale_inv.contiguous()


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |approx − reference| / max|reference| over a tensor (0 for an all-zero reference)."""
    ref = reference.float()
    denom = float(ref.abs().max())
    if denom == 0.0:
        return 0.0, 0.0
    err = (approx.float() - ref).abs() / denom
    return float(err.max()), float(err.mean())
