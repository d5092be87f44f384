"""FP8 block format: round trip, the edge block, the scale shape, and a hand-computed dequantization."""

import pytest
import torch

from dsft.model import fp8


def test_round_trip_with_edge_blocks_is_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.02  # neither dim divisible by 128
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (3, 2)
    back = fp8.dequantize(q, s)
    max_rel, mean_rel = fp8.relative_error(w, back)
    assert max_rel < 2 ** -4 and mean_rel < 2 ** -7  # e4m3 has 3 mantissa bits
    assert max_rel > 0  # it is lossy: a no-op would not pass


def test_dequantize_matches_a_hand_computed_block():
    q = torch.full((130, 129), 2.0).to(torch.float8_e4m3fn)
    s = torch.tensor([[0.5, 3.0], [7.0, 11.0]])
    w = fp8.dequantize(q, s)
    assert w[0, 0] == 1.0 and w[0, 128] == 6.0 and w[129, 0] == 14.0 and w[129, 128] == 22.0


def test_block_max_maps_to_448_and_zero_blocks_keep_unit_scale():
    w = torch.zeros(128, 256)
    w[5, 7] = 3.5
    q, s = fp8.quantize(w)
    assert float(s[0, 0]) == pytest.approx(3.5 / 448.0) and float(s[0, 1]) == 1.0
    assert float(q.float()[5, 7]) == 448.0


def test_wrong_scale_shape_and_config_detection():
    with pytest.raises(ValueError, match="needs scale_inv"):
        fp8.dequantize(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(1, 1))
    assert fp8.block_size_of({"quantization_config": fp8.quantization_config()}) == (128, 128)
    assert fp8.block_size_of({}) is None
