"""Host-memory offload for one-process training: AdamW state + fp32 master weights, and saved activations, in CPU RAM.

The OOM ladder's last rung (seed 5.2: "CPU/ZeRO offload where available") and `train.offload: true` without a
multi-process strategy. What it moves off the accelerator:
- the optimizer: `HostOffloadAdamW` keeps an fp32 master copy of every trainable parameter and its AdamW moments
  in host memory (pinned when CUDA is present); each step copies the gradients to the host, steps there and copies
  the new weights back — ZeRO-Offload's split, for one process;
- activations: tensors autograd saves for backward go to host memory (`torch.autograd.graph.save_on_cpu`) and come
  back when backward needs them.
On a CPU-only machine there is nothing to move (everything is in host memory already), so the ladder does not offer
this rung there; the mechanics are the same on any device, which is what the tests check.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch


def offload_available(device: torch.device) -> bool:
    """Whether offloading to host memory frees anything: only when training runs on an accelerator."""
    return device.type != "cpu"


def activation_offload(enabled: bool, device: torch.device):
    """Context manager: autograd's saved tensors live in host memory (pinned on CUDA) while enabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


class _StateView:
    """`opt.state` seen through the device parameters (what checkpoint save/load index by), stored on the host."""

    def __init__(self, owner: HostOffloadAdamW):
        self._o = owner

    def __getitem__(self, p) -> dict[str, Any]:
        return self._o.inner.state[self._o.master[p]]

    def get(self, p, default=None):
        hp = self._o.master.get(p)
        return self._o.inner.state.get(hp, default) if hp is not None else default

    def items(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for p, hp in self._o.master.items():
            if hp in self._o.inner.state:
                yield p, self._o.inner.state[hp]

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def clear(self) -> None:
        self._o.inner.state.clear()


class HostOffloadAdamW:
    """An AdamW whose state and fp32 master weights live in host memory; a drop-in for the loop's optimizer.

    `param_groups` hold the device parameters (so gradient clipping, GradScaler and the LR schedule work on them
    unchanged); `state` is a view keyed by device parameters (so checkpoints are the same files as without offload).
    """

    def __init__(self, opt: torch.optim.Optimizer, host: torch.device | str = "cpu"):
        self.host = torch.device(host)
        pin = torch.cuda.is_available() and self.host.type == "cpu"
        self.master: dict[torch.Tensor, torch.Tensor] = {}
        groups = []
        for g in opt.param_groups:
            hps = []
            for p in g["params"]:
                hp = p.detach().to(self.host, torch.float32, copy=True)
                if pin:
                    hp = hp.pin_memory()
                self.master[p] = hp
                hps.append(hp)
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": hps})
        accepted = set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "foreach", "fused", "capturable"}
        defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
        self.inner = torch.optim.AdamW(groups, **defaults, foreach=True)
        for p, st in opt.state.items():  # carry the moments over, so the run continues as if nothing happened
            self.inner.state[self.master[p]] = {
                k: (v.detach().to(self.host, torch.float32 if k != "step" else v.dtype, copy=True)
                    if isinstance(v, torch.Tensor) else v)
                for k, v in st.items()}
        self.param_groups = opt.param_groups
        self.defaults = opt.defaults
        self.state = _StateView(self)
        opt.state.clear()  # free the device copies of the moments

    def moved_bytes(self) -> int:
        """Bytes of master weights + moments now held in host memory."""
        n = sum(hp.numel() * hp.element_size() for hp in self.master.values())
        for st in self.inner.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("HostOffloadAdamW.step does not take a closure")
        for g, hg in zip(self.param_groups, self.inner.param_groups, strict=True):
            for k, v in g.items():  # lr and weight decay as the loop set them on the device groups
                if k != "params":
                    hg[k] = v
            for p, hp in zip(g["params"], hg["params"], strict=True):
                hp.grad = None if p.grad is None else p.grad.detach().to(self.host, torch.float32)
        for st in self.inner.state.values():  # a checkpoint load may have put moments on the device
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step" and v.device != self.host:
                    st[k] = v.to(self.host, torch.float32)
                elif k == "step" and isinstance(v, torch.Tensor) and v.device.type != "cpu":
                    st[k] = v.cpu()
        self.inner.step()
        for p, hp in self.master.items():
            if hp.grad is not None:
                p.copy_(hp, non_blocking=True)
                hp.grad = None
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def load_master_from_params(self) -> None:
        """After a checkpoint wrote new device weights: refresh the host master copies."""
        with torch.no_grad():
            for p, hp in self.master.items():
                hp.copy_(p.detach().to(self.host, torch.float32))
