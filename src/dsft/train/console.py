"""What `dsft train` prints before the first step: method, sizes, batch, schedule, adapter targets."""

from __future__ import annotations

import re

from dsft.train.recipe import Recipe


def print_setup(r: Recipe) -> None:
    info, enc, hp, dist = r.info, r.enc_rep, r.hp, r.dist
    share = 100 * info["trainable_params"] / max(1, info["total_params"])
    lines = [f"dsft train: {info['method']} on {r.model_dir.name} ({info['total_params']:,} params, preset {hp.preset}), "
             f"{info['trainable_params']:,} trainable ({share:.2f} %)",
             f"dsft train: {len(r.examples)} examples ({enc.tokens:,} tokens, {enc.truncated} truncated, dropped "
             f"{enc.dropped}), {r.total_steps} steps, lr {hp.learning_rate:g}, micro-batch {r.micro}, effective batch "
             f"{r.effective}, {r.device.type} {r.precision}"
             + (f", {dist.world} processes ({dist.label})" if dist.world > 1 else "")]
    if "targets" in info:
        t = info["targets"]
        lines.append(f"dsft train: LoRA r={info['r']} alpha={info['alpha']} on {t['modules']} modules + "
                     f"{t['expert_parameters']} fused expert parameters {t['by_kind']}; fully trained: {info['modules_to_save']}")
        lines.append("dsft train: adapters on " + ", ".join(compact_names(info["adapted"])))
        if t["skipped"]:
            lines.append("dsft train: not adapted: " + ", ".join(f"{k} ({v})" for k, v in compact_skips(t["skipped"])))
    for line in lines:
        print(line, flush=True)


def compact_names(names: list[str]) -> list[str]:
    """`model.layers.{0-3}.self_attn.q_a_proj`-style summary of per-layer module names."""
    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"\.layers\.(\d+)\.", n)
        key = re.sub(r"\.layers\.\d+\.", ".layers.{}.", n) if m else n
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for key, idx in groups.items():
        idx = sorted(i for i in idx if i >= 0)
        if not idx:
            out.append(key)
            continue
        span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
        out.append(key.replace("{}", "{" + span + "}").removeprefix("model."))
    return out


def compact_skips(skipped: dict[str, str]) -> list[tuple[str, str]]:
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    return [(c, why) for why, names in by_reason.items() for c in compact_names(names)]
