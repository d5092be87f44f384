"""Multi-GPU throughput: gradient all-reduce or ZeRO/FSDP traffic per step against compute time, per interconnect.

Collectives follow NCCL's ring algorithms (α–β model): an all-reduce of B bytes over n GPUs moves 2(n−1)/n·B per
GPU in 2(n−1) latency steps; an all-gather or reduce-scatter of B bytes moves (n−1)/n·B in n−1 steps. Traffic
that runs beside compute (DDP's gradient buckets during backward, ZeRO-3's prefetched gathers) hides up to
OVERLAP of itself behind the compute it runs beside; the rest is exposed. docs/plan.md derives the numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dsft.errors import ConfigError
from dsft.plan.hardware import Gpu
from dsft.plan.request import PlanRequest, gathered_bytes_per_param, trainable_params, weight_bytes
from dsft.plan.throughput import forward_flops_per_token, train_flops_per_token

GBPS = 1e9  # bytes/s in one GB/s
LINK_EFFICIENCY = 0.8  # share of the vendor's per-direction peak a large NCCL collective reaches (assumed)
OVERLAP = 0.8  # share of the traffic that can hide behind the compute it runs beside (assumed)
BUCKET = 25 * 1024**2  # DDP's default gradient bucket; one collective (one latency) per bucket
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per GPU per direction, vendor peak
    latency: float  # seconds per ring step
    source: str


# per-direction peak per GPU (vendor figures): NVLink 3 (A100) 12 links × 25 GB/s; NVLink 4 (H100/H200) 18 × 25 GB/s;
# the RTX 3090's NVLink bridge 112.5 GB/s both ways; PCIe 4.0 / 5.0 x16 32 / 64 GB/s; one 200 Gb/s HDR InfiniBand
# NIC per GPU (DGX A100) 25 GB/s
NVLINK = {"A100-40GB": 300.0, "A100-80GB": 300.0, "H100-80GB": 450.0, "H200-141GB": 450.0, "RTX3090-24GB": 56.25}
PCIE = {"H100-80GB": 64.0, "H200-141GB": 64.0}  # PCIe 5.0 x16; every other GPU here: PCIe 4.0 x16 (32 GB/s)
NETWORK_GBS = 25.0
LATENCY = {"nvlink": 10e-6, "pcie": 20e-6, "network": 50e-6}
INTERCONNECTS = ("nvlink", "pcie", "network")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb/s|gbps|gbit/s|gb|gib/s)\s*$", re.I)


def default_interconnect(gpu: Gpu) -> str:
    """NVLink for the SXM data-centre GPUs (A100, H100, H200), PCIe for the rest."""
    return "nvlink" if gpu.name in NVLINK and not gpu.name.startswith("RTX") else "pcie"


def link(name: str | None, gpu: Gpu) -> Link:
    """The interconnect `name` (nvlink, pcie, network, or a rate like 50GB/s or 200Gbps) as seen from `gpu`."""
    key = (name or default_interconnect(gpu)).strip().lower()
    if key == "nvlink":
        if gpu.name not in NVLINK:
            raise ConfigError(f"--interconnect nvlink: {gpu.name} has no NVLink (choose pcie or network, or a rate "
                              f"such as 50GB/s)")
        return Link("NVLink", NVLINK[gpu.name] * GBPS, LATENCY["nvlink"], f"{gpu.name} NVLink, per direction")
    if key == "pcie":
        gen = "5.0" if gpu.name in PCIE else "4.0"
        return Link(f"PCIe {gen} x16", PCIE.get(gpu.name, 32.0) * GBPS, LATENCY["pcie"], "PCIe x16, per direction")
    if key in ("network", "infiniband", "ib"):
        return Link("network (200 Gb/s per GPU)", NETWORK_GBS * GBPS, LATENCY["network"],
                    "one 200 Gb/s InfiniBand HDR NIC per GPU")
    m = _RATE.match(key)
    if m:
        value, unit = float(m.group(1)), m.group(2)
        rate = value / 8 if unit in ("gbps", "gbit/s") else value * (1.073741824 if unit == "gib/s" else 1.0)
        if rate <= 0:
            raise ConfigError(f"--interconnect {name!r}: the rate must be positive")
        return Link(f"{rate:g} GB/s link", rate * GBPS, LATENCY["network"], "given on the command line")
    raise ConfigError(f"--interconnect {name!r}: expected nvlink, pcie, network or a rate such as 50GB/s or 200Gbps")


def _ring(nbytes: float, n: int, lk: Link, *, all_reduce: bool) -> float:
    """Seconds of one ring collective over n GPUs (all-reduce, else all-gather / reduce-scatter) of nbytes."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2 if all_reduce else 1
    buckets = max(1, math.ceil(nbytes / BUCKET))
    return factor * (n - 1) * lk.latency * buckets + factor * (n - 1) / n * nbytes / (lk.bandwidth * LINK_EFFICIENCY)


def traffic(req: PlanRequest, lk: Link) -> dict[str, float]:
    """Seconds of communication per optimizer step, split by where it can overlap: `per_micro` (beside each
    micro-batch's compute window) and `per_step` (beside the last micro-batch's backward), plus bytes moved."""
    n = req.num_gpus
    grads = trainable_params(req) * (4 if req.adapter else weight_bytes(req))  # gradients in the parameters' dtype
    params16 = req.arch.total_params() * gathered_bytes_per_param(req)
    if req.sharding in ("zero3", "fsdp"):
        # every micro-batch: gather the parameters for forward and again for backward, reduce-scatter gradients
        per_micro = 2 * _ring(params16, n, lk, all_reduce=False) + _ring(grads, n, lk, all_reduce=False)
        moved = req.grad_accum * (2 * params16 + grads) * (n - 1) / n
        return {"per_micro": per_micro, "per_step": 0.0, "bytes": moved, "kind": "ZeRO-3/FSDP parameter gathers + gradient reduce-scatter"}
    if req.sharding == "zero2":
        updated = trainable_params(req) * 2
        per_micro = _ring(grads, n, lk, all_reduce=False)
        per_step = _ring(updated, n, lk, all_reduce=False)
        moved = (req.grad_accum * grads + updated) * (n - 1) / n
        return {"per_micro": per_micro, "per_step": per_step, "bytes": moved, "kind": "ZeRO-2 reduce-scatter + gather"}
    # DDP and ZeRO-1: one all-reduce of the gradients per optimizer step (accumulation steps skip it)
    return {"per_micro": 0.0, "per_step": _ring(grads, n, lk, all_reduce=True), "bytes": 2 * (n - 1) / n * grads,
            "kind": "gradient all-reduce"}


def _exposed(comm: float, window: float) -> float:
    """Communication left on the critical path when it runs beside `window` seconds of compute."""
    return comm - min(OVERLAP * comm, window)


def scaling(req: PlanRequest, tflops: float | None) -> dict[str, Any] | None:
    """Scaling efficiency of req.num_gpus GPUs (throughput / (n × one GPU's)) with the traffic that explains it;
    None on one GPU or when the device's FLOPS are unknown."""
    tf = tflops or req.gpu.bf16_tflops
    if req.num_gpus <= 1 or not tf:
        return None
    lk = link(req.interconnect, req.gpu)
    if req.num_gpus > GPUS_PER_NODE and lk.bandwidth > NETWORK_GBS * GBPS:
        lk = Link(f"{lk.name} inside nodes, network between them", NETWORK_GBS * GBPS, LATENCY["network"],
                  f"over {GPUS_PER_NODE} GPUs the ring crosses the network (200 Gb/s per GPU)")
    rate = tf * 1e12 * req.mfu
    tokens = req.tokens  # pairs: both sequences; GRPO: G rollouts per prompt
    micro = tokens * train_flops_per_token(req) / rate
    backward = micro - tokens * forward_flops_per_token(req) / rate
    t = traffic(req, lk)
    exposed = req.grad_accum * _exposed(t["per_micro"], micro) + _exposed(t["per_step"], backward)
    compute = req.grad_accum * micro
    eff = compute / (compute + exposed)
    return {"gpus": req.num_gpus, "interconnect": lk.name, "bandwidth_gb_s": lk.bandwidth / GBPS,
            "traffic": t["kind"], "bytes_per_step": t["bytes"], "comm_s": req.grad_accum * t["per_micro"] + t["per_step"],
            "compute_s": compute, "exposed_s": exposed, "efficiency": eff, "speedup": req.num_gpus * eff}


def describe(s: dict[str, Any]) -> str:
    """One line: traffic against compute, the efficiency, the seed's rule of thumb beside it."""
    return (f"multi-GPU: {s['gpus']} GPUs over {s['interconnect']} ({s['bandwidth_gb_s']:g} GB/s per direction): "
            f"{s['traffic']} {s['bytes_per_step'] / 1e9:,.2f} GB per GPU per step in {s['comm_s']:.3g} s beside "
            f"{s['compute_s']:.3g} s of compute ({s['exposed_s']:.3g} s exposed) → scaling efficiency "
            f"{100 * s['efficiency']:.0f} %, ≈ {s['speedup']:.2f}× one GPU (seed: 2 cards ≈ 1.8×; NVLink matters)")
