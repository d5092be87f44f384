"""Packing without leaks: per-sample losses of a packed batch equal one-at-a-time losses (fp32, |Δ| ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from dsft.model.load import load_model, resolve_model_dir
from dsft.model.tokenizer import load_tokenizer
from dsft.train.batching import StepPlan, collate_packed, collate_padded
from dsft.train.encode import encode_records
from dsft.train.loss import CausalLMLoss, per_sample_losses


@pytest.fixture(scope="module")
def setup(records16):
    tok = load_tokenizer("embedded")
    exs, _ = encode_records(tok, records16, 192)
    model = load_model(resolve_model_dir("embedded:tiny-deepseek-v3"), dtype="float32").eval()
    return tok, exs, CausalLMLoss(model)


def test_packed_per_sample_losses_equal_unpacked(setup):
    tok, exs, lm = setup
    exs = exs[:8]
    packed = collate_packed(exs, capacity=512, pad_id=tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)  # really packed: several samples per row
    got = per_sample_losses(lm, packed)
    for i, ex in enumerate(exs):
        alone = per_sample_losses(lm, collate_padded([ex], tok.pad_token_id))[0]
        assert abs(got[i] - alone) <= 1e-5, (i, got[i], alone)
    # padded batches (packing off) give the same per-sample losses too
    padded = per_sample_losses(lm, collate_padded(exs, tok.pad_token_id))
    assert max(abs(padded[i] - got[i]) for i in range(len(exs))) <= 1e-5


def test_the_check_detects_cross_sample_attention(setup):
    tok, exs, lm = setup
    packed = collate_packed(exs[:6], capacity=512, pad_id=tok.pad_token_id)
    leaky = dict(packed)
    w = packed["input_ids"].shape[1]
    leaky["position_ids"] = torch.arange(w).expand_as(packed["position_ids"]).contiguous()  # one long sequence
    a, b = per_sample_losses(lm, packed), per_sample_losses(lm, leaky)
    assert max(abs(a[i] - b[i]) for i in a) > 1e-3


def test_step_plan_is_deterministic_and_covers_each_epoch():
    plan = StepPlan(n=21, effective_batch=4, seed=3)
    assert plan.steps_per_epoch == 6
    ep0 = [i for s in range(6) for i in plan.samples(s)]
    assert sorted(ep0) == list(range(21))
    assert [plan.samples(s) for s in range(12)] == [StepPlan(21, 4, 3).samples(s) for s in range(12)]
    assert plan.samples(0) != plan.samples(6)  # reshuffled each epoch


def test_per_sample_attention_equals_masked_packing_and_one_at_a_time(records16):
    from dsft.train.attention import use_packed_attention

    tok = load_tokenizer("embedded")
    exs, _ = encode_records(tok, records16, 192)
    model = load_model(resolve_model_dir("embedded:tiny-deepseek-v3"), dtype="float32").eval()
    lm = CausalLMLoss(model)
    packed = collate_packed(exs[:8], capacity=512, pad_id=tok.pad_token_id)
    alone = [per_sample_losses(lm, collate_padded([e], tok.pad_token_id))[0] for e in exs[:8]]
    assert use_packed_attention(model) == "sdpa"
    got = per_sample_losses(lm, packed)
    assert max(abs(got[i] - alone[i]) for i in range(8)) <= 1e-5


def test_length_grouped_batches_pad_less_than_random_ones(setup):
    tok, exs, _ = setup
    lengths = tuple(len(e.input_ids) for e in exs)

    def padded_tokens(plan):
        return sum(max(lengths[i] for i in plan.samples(s)) * len(plan.samples(s)) for s in range(plan.steps_per_epoch))

    grouped = StepPlan(len(exs), 4, 0, group_by_length=True, lengths=lengths)
    plain = StepPlan(len(exs), 4, 0)
    assert sorted(i for s in range(grouped.steps_per_epoch) for i in grouped.samples(s)) == list(range(len(exs)))
    assert padded_tokens(grouped) < padded_tokens(plain)


def test_length_grouped_packed_attention_equals_one_sdpa_call_per_sample():
    """packed_attention batches equal-length samples (across rows) into one SDPA call: its output and the gradients
    of query, key and value equal causal SDPA run on every packed sample by itself (trailing padding included)."""
    import torch.nn.functional as F

    from dsft.train.attention import packed_attention

    g = torch.Generator().manual_seed(0)
    rows = [[5, 3, 5, 2, 1], [3, 5, 4, 4]]  # sample lengths per row; the shorter row ends in a padding segment
    L = max(sum(r) for r in rows)
    pos = torch.zeros(len(rows), L, dtype=torch.long)
    for b, lens in enumerate(rows):
        c = 0
        for n in [*lens, L - sum(lens)]:
            pos[b, c:c + n] = torch.arange(n)
            c += n
    q, k, v = (torch.randn(len(rows), 4, L, d, generator=g, requires_grad=True) for d in (8, 8, 6))
    out, _ = packed_attention(None, q, k, v, position_ids=pos, scaling=0.3)
    want = torch.zeros(len(rows), L, 4, 6)
    for b, lens in enumerate(rows):
        c = 0
        for n in [*lens, L - sum(lens)]:
            if n:
                s = slice(c, c + n)
                want[b, s] = F.scaled_dot_product_attention(q[b:b + 1, :, s], k[b:b + 1, :, s], v[b:b + 1, :, s],
                                                            is_causal=True, scale=0.3)[0].transpose(0, 1)
            c += n
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-6)
    w = torch.randn(want.shape, generator=g)
    got_grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got_grads, want_grads, strict=True))
