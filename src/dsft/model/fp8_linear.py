"""Frozen FP8 linears: e4m3 weights + 128×128-block scales kept as stored, dequantized one module at a time.

`FP8Linear` replaces an ``nn.Linear`` whose checkpoint weight is FP8. Its weight stays ``float8_e4m3fn`` (1 byte per
parameter) with the float32 ``weight_scale_inv`` beside it; every forward dequantizes the block-scaled weight into a
temporary, multiplies, and drops it; backward dequantizes again (the temporary is never saved for backward — only
the FP8 tensors the module already holds are). The weight is frozen: only the input gets a gradient, so LoRA/DoRA
adapters (PEFT wraps an ``nn.Linear``; this is one) train on top. `FP8Experts` holds a MoE layer's routed experts
one FP8 expert MLP each, named as DeepSeek ships them (``experts.E.{gate,up,down}_proj``), so routed experts are
dequantized one expert at a time and LoRA adapts each expert's projections as ordinary linears.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsft.model import fp8


class DequantLinearFunction(torch.autograd.Function):
    """y = x · dequant(W)ᵀ with W in FP8; backward recomputes dequant(W) instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
        w = fp8.dequantize(weight_fp8, scale_inv, block, dtype=x.dtype)
        ctx.save_for_backward(weight_fp8, scale_inv)  # the module's own FP8 tensors: no copy
        ctx.block = block
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight_fp8, scale_inv = ctx.saved_tensors
        w = fp8.dequantize(weight_fp8, scale_inv, ctx.block, dtype=grad_out.dtype)
        return grad_out @ w, None, None, None


class FP8Linear(nn.Linear):
    """A frozen, bias-free linear whose weight is held in DeepSeek's FP8 block format (see module docstring).

    ``weight`` is a property: the dequantized weight as a fresh temporary (for PEFT's dtype checks and DoRA's weight
    norm). Merging an adapter into it in place is impossible: dsft's merge refuses FP8 bases (use the export stage).
    """

    is_fp8 = True

    def __init__(self, in_features: int, out_features: int, *, block: tuple[int, int] = fp8.BLOCK,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = "meta") -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=fp8.FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(fp8.scale_shape((out_features, in_features), self.block),
                                                             dtype=torch.float32, device=device))
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return fp8.dequantize(self.weight_fp8, self.weight_scale_inv, self.block, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantLinearFunction.apply(x, self.weight_fp8, self.weight_scale_inv, self.block)

    def set_fp8(self, weight_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Install the stored tensors (shapes and dtypes checked)."""
        want = (self.out_features, self.in_features)
        if tuple(weight_fp8.shape) != want or weight_fp8.dtype != fp8.FP8_DTYPE:
            raise ValueError(f"FP8 weight {tuple(weight_fp8.shape)} {weight_fp8.dtype}: expected {want} {fp8.FP8_DTYPE}")
        if tuple(scale_inv.shape) != fp8.scale_shape(want, self.block):
            raise ValueError(f"weight_scale_inv {tuple(scale_inv.shape)}: expected {fp8.scale_shape(want, self.block)}")
        self.weight_fp8 = weight_fp8
        self.weight_scale_inv = scale_inv.float()

    def resident_bytes(self) -> int:
        """Bytes this module holds: the FP8 weight + its scales."""
        return self.weight_fp8.nbytes + self.weight_scale_inv.nbytes

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the FP8 tensors; `.to(dtype)` / `.float()` / `.half()` change only the compute dtype
        (casting the stored e4m3 weight or its float32 scales would lose the format)."""
        held = {k: self._buffers.pop(k) for k in ("weight_fp8", "weight_scale_inv")}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in held.items():
                probe = fn(torch.empty(0, dtype=torch.float32, device=t.device))
                self._buffers[k] = t if t.device == probe.device else t.to(probe.device)
                if k == "weight_fp8" and probe.is_floating_point():
                    self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, block={self.block}"


class FP8ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) · up(x)) over FP8 linears."""

    def __init__(self, hidden: int, intermediate: int, act_fn, *, block: tuple[int, int]) -> None:
        super().__init__()
        self.gate_proj = FP8Linear(hidden, intermediate, block=block)
        self.up_proj = FP8Linear(hidden, intermediate, block=block)
        self.down_proj = FP8Linear(intermediate, hidden, block=block)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FP8Experts(nn.ModuleList):
    """A MoE layer's routed experts as DeepSeek ships them, one FP8 expert at a time; the call signature and routing
    arithmetic of transformers' fused DeepseekV3Experts (tokens gathered per hit expert, weighted, index-added)."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, act_fn, *, block: tuple[int, int]) -> None:
        super().__init__([FP8ExpertMLP(hidden, intermediate, act_fn, block=block) for _ in range(n_experts)])
        self.num_experts = n_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one extra class: index num_experts is "no expert" (transformers' V3.2 router may emit it); skipped
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask[: self.num_experts].sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            out = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def fp8_modules(model) -> list[tuple[str, FP8Linear]]:
    """(name, module) of every FP8Linear in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FP8Linear)]


def has_fp8(model) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())


def fp8_resident_bytes(model) -> tuple[int, int]:
    """(bytes held, parameters represented) of the model's FP8 linears."""
    mods = [m for _, m in fp8_modules(model)]
    return sum(m.resident_bytes() for m in mods), sum(m.in_features * m.out_features for m in mods)
