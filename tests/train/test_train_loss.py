"""The fused, chunked LM-head + cross-entropy equals torch's cross_entropy on the full logits (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsft.train.loss import _FusedLinearCrossEntropy, _softmax_and_ce_


@pytest.mark.parametrize(("scale", "bias"), [(0.05, False), (0.05, True), (40.0, False)])
def test_fused_linear_ce_matches_cross_entropy(scale, bias):
    torch.manual_seed(0)
    n, v, d = 300, 3000, 32
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * scale).requires_grad_()
    b = (torch.randn(v) * scale).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,))
    loss = _FusedLinearCrossEntropy.apply(h, w, b, t, 128)  # chunks of 128 rows, the last one short
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    ref = F.cross_entropy(F.linear(h2, w2, b2), t, reduction="sum")
    ref.backward()
    assert torch.isfinite(loss)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_rows_whose_target_probability_underflows_are_recomputed_exactly():
    logits = torch.tensor([[0.0, 200.0, 1.0], [2.0, 1.0, 0.0]])
    targets = torch.tensor([0, 0])
    probs, loss, redo = _softmax_and_ce_(logits.clone(), targets)
    assert redo is not None and redo.tolist() == [True, False]  # p_target = e^-200: −log p is not usable in fp32
    torch.testing.assert_close(probs, F.softmax(logits, -1))
    ref = F.cross_entropy(logits, targets, reduction="none")
    assert abs(float(loss[1]) - float(ref[1])) < 1e-6
    w = torch.cat([logits, torch.zeros(1, 3)]).t().contiguous()  # h = e_i picks logits row i: h @ wᵀ = logits
    fused = _FusedLinearCrossEntropy.apply(torch.eye(3)[:2], w, None, targets, 8)
    assert abs(float(fused) - float(ref.sum())) < 1e-4  # 200 + log(1 + e^-199 + …) + the second row
