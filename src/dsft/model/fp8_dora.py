"""DoRA over an FP8 base with LoRA dropout: the base term through the FP8 module, never a saved dequantized weight.

PEFT's DoRA reuses the base layer's output when dropout is off. With dropout on, it recomputes the base term on the
dropped input as ``F.linear(x, dequantize(weight))``, and autograd keeps that dense weight for the input's gradient:
one dequantized copy per adapted module, alive until backward — over a whole model, the full-precision copy an FP8
base exists to avoid. `FP8DoraLinearLayer` computes the same term through the base module (`FP8Linear`, which
re-dequantizes in backward and saves only its e4m3 weight and scales); the arithmetic is PEFT's, so outputs and
gradients are equal.
"""

from __future__ import annotations

from peft.tuners.lora.dora import DoraLinearLayer

from dsft.model.fp8_linear import FP8Linear


class FP8DoraLinearLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude layer whose base term, when recomputed on a dropped input, runs through the FP8 module."""

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        if base_result is None and isinstance(base_layer, FP8Linear):
            base_result = base_layer(x)  # the bias-free FP8 linear: y = x · dequant(W)ᵀ, nothing dense saved
        return super().forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                               base_result=base_result, adapter_name=adapter_name)


def use_fp8_dora(peft_model) -> int:
    """Switch the DoRA magnitude layers of FP8 modules to `FP8DoraLinearLayer` (same parameters, same state-dict
    keys); returns how many were switched."""
    n = 0
    for mod in peft_model.modules():
        mags = getattr(mod, "lora_magnitude_vector", None)
        if mags is None or not isinstance(getattr(mod, "base_layer", None), FP8Linear):
            continue
        for layer in mags.values():
            if type(layer) is DoraLinearLayer:
                layer.__class__ = FP8DoraLinearLayer
                n += 1
    return n
