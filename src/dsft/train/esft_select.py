"""ESFT step 2: choose the experts to train from the profile (top_p per layer), and the run's `esft/` folder.

`<run_dir>/esft/` holds `expert_scores.json` (the profile + the selection), `expert_config.json` (the selection in
deepseek-ai/ESFT's format) and `expert_scores.png` (the heatmap). `selection_for_run` reuses a profile made of
the same base model, data, sample size and seed (a resumed run selects the same experts) and profiles otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dsft.errors import TrainError
from dsft.run import atomic_write_json
from dsft.train.esft import MoeLayer, Selection, describe, require_moe, selection_from_config

log = logging.getLogger("dsft.train")
SCORES_FILE = "expert_scores.json"


def select_top_p(shares: list[float], top_p: float) -> list[int]:
    """Experts in descending share (ties: lower id first) until the cumulative share reaches top_p; never an
    expert with share 0. Sorted ids."""
    order = sorted(range(len(shares)), key=lambda e: (-shares[e], e))
    chosen: list[int] = []
    total = 0.0
    for e in order:
        if total >= top_p or shares[e] <= 0:
            break
        chosen.append(e)
        total += shares[e]
    return sorted(chosen)


def select_experts(scores: dict[str, Any], score: str, top_p: float) -> dict[int, list[int]]:
    """{layer: experts} from a profile (`expert_scores.json`'s `layers`) by `score` (token | gate) and top_p."""
    return {int(li): select_top_p(s[score], top_p) for li, s in scores["layers"].items()}


def trainable_params(layers: list[MoeLayer], sel: Selection, model) -> int:
    """Parameters ESFT will train for this selection (routed experts + the ablation switches' modules)."""
    by_index = {layer.index: layer for layer in layers}
    n = 0
    for li, experts in sel.experts.items():
        ex = by_index[li].experts
        n += len(experts) * (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel())
    for name, p in model.named_parameters():
        if ".mlp.gate." in name or ".mlp.experts." in name:
            continue
        shared = ".shared_experts." in name
        if (sel.shared_experts and shared) or (sel.non_expert_modules and not shared):
            n += p.numel()
    return n


def _fingerprint(model_dir: Path, dataset: str, ecfg, seed: int) -> dict[str, Any]:
    return {"model": str(model_dir), "dataset": dataset, "sample_tokens": ecfg.sample_tokens, "seed": seed}


def load_scores(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrainError(f"{path}: unreadable ESFT profile ({err}); delete it to profile again") from None


def profile_and_select(cfg, esft_dir: Path, model, model_dir: Path, token_lists: list[list[int]], dataset: str,
                       *, pad_id: int = 0, write: bool = True, echo=print) -> Selection:
    """Reuse or make the profile, select by esft.score/top_p, write esft/ (when `write`), print the choice."""
    from dsft.train.esft_profile import heatmap, profile_experts

    ecfg, seed = cfg.esft, cfg.train.seed
    layers = require_moe(model, "esft profile")
    fp = _fingerprint(model_dir, dataset, ecfg, seed)
    path = esft_dir / SCORES_FILE
    scores = load_scores(path) if path.exists() else None
    if scores is None or scores.get("fingerprint") != fp:
        scores = profile_experts(model, token_lists, sample_tokens=ecfg.sample_tokens, seed=seed, pad_id=pad_id)
        scores["fingerprint"] = fp
        how = f"profiled on {scores['tokens']:,} tokens of {scores['examples']} examples"
    else:
        how = f"profile reused ({path})"
    sel = selection_from_config(ecfg)
    if sel is None:
        sel = Selection(experts=select_experts(scores, ecfg.score, ecfg.top_p), shared_experts=ecfg.train_shared_experts,
                        non_expert_modules=ecfg.train_non_expert_modules,
                        info={"selected_by": f"esft.score {ecfg.score}, top_p {ecfg.top_p:g}"})
    sel.info.update(score=ecfg.score, top_p=ecfg.top_p, profile_tokens=scores["tokens"])
    scores["selection"] = {"score": ecfg.score, "top_p": ecfg.top_p, "experts": {str(k): v for k, v in sel.experts.items()}}
    if write:
        esft_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, scores)
        atomic_write_json(esft_dir / "expert_config.json", {"experts": {str(k): v for k, v in sel.experts.items()},
                                                           "shared_experts": sel.shared_experts,
                                                           "non_expert_modules": sel.non_expert_modules})
        heatmap(scores, ecfg.score, sel.experts, esft_dir / "expert_scores.png")
    n_train = trainable_params(layers, sel, model)
    n_total = sum(p.numel() for p in model.parameters())
    if echo:
        echo(f"dsft esft: {how}; {sel.info['selected_by']}: {sel.count()} of {sum(la.n_experts for la in layers)} "
             f"routed experts, {n_train:,} trainable parameters ({100 * n_train / n_total:.1f} % of {n_total:,})")
        for line in describe(sel, layers):
            echo(line)
    return sel


def selection_for_run(cfg, run_root: Path, model, model_dir: Path, examples: list, *, tok,
                      is_main: bool = True) -> Selection:
    """The experts `dsft train` (method esft) trains: profile the run's training examples → `<run_dir>/esft/`."""
    from dsft.train.encode import dataset_fingerprint

    return profile_and_select(cfg, Path(run_root) / "esft", model, model_dir, [e.input_ids for e in examples],
                              dataset_fingerprint(examples), pad_id=tok.pad_token_id or 0, write=is_main,
                              echo=print if is_main else None)


def profile_run(cfg, run, *, echo=print) -> tuple[Selection, Path]:
    """`dsft esft profile CONFIG`: profile the base on the run's train.jsonl exactly as `dsft train` (method esft)
    would (same examples, so training reuses the profile); returns (selection, the run's esft/ folder)."""
    from dsft.model.load import load_model, resolve_model_dir
    from dsft.model.tokenizer import load_tokenizer
    from dsft.train.encode import dataset_fingerprint, encode_records
    from dsft.train.stage import read_splits

    records, _, train_path = read_splits(run)
    model_dir = resolve_model_dir(cfg.model.name_or_path).resolve()
    tok = load_tokenizer(cfg.model.tokenizer or str(model_dir), trust_remote_code=cfg.model.trust_remote_code,
                         chat_template=cfg.model.chat_template)
    examples, _ = encode_records(tok, records, cfg.data.max_seq_length, source=str(train_path))
    model = load_model(model_dir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    esft_dir = run.root / "esft"
    sel = profile_and_select(cfg, esft_dir, model, model_dir, [e.input_ids for e in examples],
                             dataset_fingerprint(examples), pad_id=tok.pad_token_id or 0, echo=echo)
    return sel, esft_dir
