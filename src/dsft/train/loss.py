"""Causal-LM loss computed only where labels exist: decoder → hidden states → LM head on labelled positions → CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsft.train.encode import IGNORE


def unwrap(model):
    """The transformers *ForCausalLM under DDP/FSDP and PEFT wrappers."""
    m = model
    while hasattr(m, "module") and isinstance(m.module, nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


_BUFFER: list[torch.Tensor] = []


def release_buffers() -> None:
    """Free the reusable CPU logits buffer (memory measurements start from nothing held)."""
    _BUFFER.clear()


def _cpu_buffer(numel: int) -> torch.Tensor:
    """A reusable flat fp32 CPU buffer of at least numel elements."""
    if not _BUFFER or _BUFFER[0].numel() < numel:
        _BUFFER[:] = [torch.empty(numel, dtype=torch.float32)]
    return _BUFFER[0][:numel]


def _softmax_and_ce_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax of fp32 `logits` in place and each row's CE; returns (probs, per-row loss, rows to redo or None).

    On CPU one fused softmax kernel (a read and a write per row while the row sits in cache) replaces separate
    max / subtract / exp / sum / divide passes over a 100 k+ wide row, and CE = −log p_target. A row whose target
    probability is below 1e-30 (fp32 −log p losing digits near underflow) is returned for an exact recompute.
    """
    rows = torch.arange(targets.numel(), device=targets.device)
    if logits.device.type != "cpu":
        target_logit = logits[rows, targets]
        mx = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(mx).exp_()
        sumexp = probs.sum(dim=-1, keepdim=True)
        loss = sumexp.log().squeeze(1) + mx.squeeze(1) - target_logit
        return probs.div_(sumexp), loss, None
    probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # in place; same kernel as F.softmax
    p_t = probs[rows, targets]
    tiny = p_t < 1e-30
    return probs, -torch.log(p_t), (tiny if bool(tiny.any()) else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(h·Wᵀ + b, targets) in chunks, computing d/dh (and d/dW, d/db when trained) during the forward.

    No logits tensor outlives its chunk: with a 100 k+ vocabulary the logits of a batch are hundreds of
    MB, and storing them for backward (what autograd does) costs more time in memory traffic than the
    matmuls. The gradient of Σ CE w.r.t. logits is softmax − one-hot, computed in place per chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(h.dtype)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            if hc.dtype == torch.float32 and hc.device.type == "cpu":
                # reuse one logits buffer across chunks and steps: a fresh 10–250 MB tensor per chunk costs page
                # faults on CPU that are as slow as the matmul itself
                logits = torch.mm(hc, w.t(), out=_cpu_buffer(hc.shape[0] * w.shape[0]).view(hc.shape[0], w.shape[0]))
            else:
                logits = (hc @ w.t()).float()
            if bias is not None:
                logits += bias.float()
            probs, loss_rows, redo = _softmax_and_ce_(logits, tc)
            if redo is not None:  # exact log Σ exp − z_target from these rows' logits, computed again
                z = (hc[redo] @ w.t()).float() + (bias.float() if bias is not None else 0.0)
                loss_rows[redo] = torch.logsumexp(z, dim=-1) - z.gather(1, tc[redo][:, None]).squeeze(1)
            total += loss_rows.sum()
            probs[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0
            g = probs.to(h.dtype)
            torch.mm(g, w, out=grad_h[i:i + chunk])
            if need_w:
                grad_w.addmm_(probs.t(), hc.float())
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, *(t for t in (grad_w, grad_b) if t is not None))
        ctx.has = (need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0)
        grad_h = grad_h * grad_out.to(grad_h.dtype)
        gw = saved.pop(0) * grad_out if ctx.has[0] else None
        gb = saved.pop(0) * grad_out if ctx.has[1] else None
        return grad_h, gw, gb, None, None


def _plain_head(head) -> bool:
    """An nn.Linear LM head (possibly trained fully via modules_to_save), not LoRA-wrapped."""
    if hasattr(head, "lora_A"):
        return False
    return isinstance(head, nn.Linear) or type(head).__name__ == "ModulesToSaveWrapper"


class CausalLMLoss(nn.Module):
    """forward(batch) → summed token cross-entropy; wrap this (not the LM) in DDP so gradients sync.

    Logits are computed only for positions that have a target (assistant tokens), in chunks, and the
    cross-entropy in fp32: the LM head over a 100 k+ vocabulary dominates small/medium models otherwise.
    mtp_weight λ > 0 (a DeepSeek-V3 model with its MTP layer attached, `dsft.model.fp8_mtp`): while training
    (grad enabled) the summed MTP cross-entropy (position i predicts t_{i+2}) × λ is added; `lm_sum`, `mtp_sum`
    and `mtp_labels` accumulate the two terms unweighted for logging (`pop_mtp`). Evaluation (no grad) stays the
    LM loss.
    """

    def __init__(self, model, chunk_size: int = 4096, mtp_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.mtp_weight = float(mtp_weight)
        self.lm_sum, self.mtp_sum, self.mtp_labels = 0.0, 0.0, 0

    def hidden(self, batch: dict[str, torch.Tensor], *, pre_norm: dict | None = None) -> torch.Tensor:
        """The decoder's last hidden state; `pre_norm["h"]` receives it before the final norm when given."""
        inner = unwrap(self.model)
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        dec = inner.get_decoder()
        hook = None
        if pre_norm is not None:
            hook = dec.norm.register_forward_pre_hook(lambda _m, args: pre_norm.__setitem__("h", args[0]))
        try:
            # use_cache=False matters: with a cache, transformers skips packed-sequence detection (NOTES.md)
            return dec(**kwargs).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()

    def head_ce(self, hs: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        """Σ CE(LM head(hs), tg) over the given rows, fused and chunked when training a plain head."""
        head = unwrap(self.model).get_output_embeddings()
        if torch.is_grad_enabled() and _plain_head(head) and tg.numel():
            w = head.weight
            # each chunk's fp32 logits ≈ 256 MB at most, whatever the vocabulary (bigger chunks: faster matmuls)
            chunk = max(16, min(self.chunk_size, (1 << 26) // w.shape[0]))
            return _fused_linear_ce(hs, w, getattr(head, "bias", None), tg, chunk)
        total = hs.new_zeros((), dtype=torch.float32)
        for i in range(0, tg.numel(), self.chunk_size):
            logits = head(hs[i:i + self.chunk_size]).float()
            total = total + F.cross_entropy(logits, tg[i:i + self.chunk_size], reduction="sum")
        return total

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mtp = self.mtp_weight > 0 and torch.is_grad_enabled()
        pre: dict | None = {} if mtp else None
        h = self.hidden(batch, pre_norm=pre)
        sel = batch["targets"] != IGNORE
        loss = self.head_ce(h[sel], batch["targets"][sel])
        if mtp:
            mtp_sum, n = self.mtp_ce(batch, pre["h"])
            self.lm_sum += float(loss.detach())
            self.mtp_sum += float(mtp_sum.detach())
            self.mtp_labels += n
            loss = loss + self.mtp_weight * mtp_sum
        return loss

    def mtp_ce(self, batch: dict[str, torch.Tensor], h_prev: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(Σ MTP cross-entropy, its label count) of one batch, from the main model's pre-norm hidden states."""
        from dsft.model.fp8_mtp import mtp_hidden, mtp_layer, mtp_targets

        inner = unwrap(self.model)
        layer = mtp_layer(inner)
        if layer is None:
            raise RuntimeError("mtp_weight > 0 but the model has no MTP layer attached")
        tg = mtp_targets(batch["targets"], batch["sample_index"], IGNORE)
        sel = tg != IGNORE
        hm = mtp_hidden(inner, layer, h_prev, batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
        return self.head_ce(hm[sel], tg[sel]), int(sel.sum())

    def pop_mtp(self) -> tuple[float, float, int]:
        """(Σ LM CE, Σ MTP CE, MTP labels) of the training forwards since the last call; resets them."""
        out = (self.lm_sum, self.mtp_sum, self.mtp_labels)
        self.lm_sum, self.mtp_sum, self.mtp_labels = 0.0, 0.0, 0
        return out


@torch.compiler.disable
def _fused_linear_ce(hs, w, bias, tg, chunk):
    """The fused head + loss as an opaque call for torch.compile (dynamo cannot trace its autograd.Function)."""
    return _FusedLinearCrossEntropy.apply(hs, w, bias, tg, chunk)


@torch.no_grad()
def per_sample_losses(loss_module: CausalLMLoss, batch: dict[str, torch.Tensor]) -> dict[int, float]:
    """Mean token CE of each sample in a (packed or padded) batch, keyed by the batch-local sample index."""
    h = loss_module.hidden(batch)
    head = unwrap(loss_module.model).get_output_embeddings()
    sel = batch["targets"] != IGNORE
    logits = head(h[sel]).float()
    ce = F.cross_entropy(logits, batch["targets"][sel], reduction="none")
    ids = batch["sample_index"][sel]
    out: dict[int, float] = {}
    for s in ids.unique().tolist():
        out[int(s)] = float(ce[ids == s].double().mean())
    return out
