"""DPO / ORPO / SimPO: the loss equals TRL's DPOTrainer on the same tiny model and batch, the formulas, the
held-out margin grows, the reference is the base with adapters disabled, and the stage writes its metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pref_helpers import preference_records
from train_helpers import make_run, tiny_cfg

from dsft.config import config_from_dict
from dsft.train import train
from dsft.train.objectives.common import Reference, disable_dropout
from dsft.train.objectives.dpo import PreferenceLoss, StepPair, collate_pairs, pair_metrics, preference_losses
from dsft.train.objectives.encode import encode_pairs


def test_preference_loss_formulas_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    nc, nr = torch.tensor([5.0, 2.0]), torch.tensor([4.0, 3.0])
    loss, c, r = preference_losses("dpo", pc, pr, nc, nr, rc, rr, beta=0.5)
    z = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-4 + 4) - (-3 + 4))]
    assert torch.allclose(loss, torch.tensor([math.log1p(math.exp(-v)) for v in z]))
    assert torch.allclose(c, torch.tensor([0.5, 0.0])) and torch.allclose(r, torch.tensor([-0.5, 0.5]))
    loss, _, _ = preference_losses("simpo", pc, pr, nc, nr, beta=2.0, gamma=0.5)
    zs = [2.0 * (-10 / 5 - -12 / 4) - 0.5, 2.0 * (-4 / 2 - -3 / 3) - 0.5]
    assert torch.allclose(loss, torch.tensor([math.log1p(math.exp(-v)) for v in zs]))
    loss, _, _ = preference_losses("orpo", pc, pr, nc, nr, lam=0.1)
    ac, ar = -10 / 5, -12 / 4
    odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
    assert loss[0].item() == pytest.approx(-ac + 0.1 * math.log1p(math.exp(-odds)), rel=1e-6)
    smooth, _, _ = preference_losses("dpo", pc, pr, nc, nr, rc, rr, beta=0.5, label_smoothing=0.2)
    assert smooth[0].item() == pytest.approx(0.8 * math.log1p(math.exp(-z[0])) + 0.2 * math.log1p(math.exp(z[0])))


def test_dpo_loss_equals_trl_dpotrainer(tmp_path):
    """Same tiny DeepSeek-V3, same LoRA weights (perturbed so policy ≠ reference), same 4 pairs: |Δ loss| ≤ 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dsft.model.load import load_model_and_tokenizer

    cfg = config_from_dict({"train": {"objective": "dpo"}, "dpo": {"beta": 0.1}})
    base, tok, _ = load_model_and_tokenizer(cfg.model)
    recs = preference_records(4, answer_chars=40)
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1, report_to=[],
                     max_length=None, use_cpu=True, bf16=False, disable_dropout=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_b_proj", "kv_b_proj", "o_proj"],
                      modules_to_save=["lm_head"], lora_dropout=0.0)
    trainer = DPOTrainer(model=base, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    disable_dropout(model)
    pairs, _ = encode_pairs(tok, recs, 512)
    rows = [trainer.train_dataset[i] for i in range(4)]
    for row, pair in zip(rows, pairs, strict=True):  # the same token ids on both sides
        assert row["prompt_ids"] + row["chosen_ids"] == pair.chosen.input_ids
        assert row["prompt_ids"] + row["rejected_ids"] == pair.rejected.input_ids
    loss_mod = PreferenceLoss(model, "dpo", cfg.dpo, reference=Reference(model, adapters=True))
    batch = collate_pairs([StepPair(k, p) for k, p in enumerate(pairs)], packing=True, capacity=1 << 30,
                          pad_id=tok.pad_token_id)
    ours = float(loss_mod(batch).detach()) / len(pairs)
    model.train()
    theirs = float(trainer.compute_loss(model, trainer.data_collator(rows)).detach())
    assert abs(ours - math.log(2)) > 0.05  # policy and reference really differ
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    margins = trainer._metrics["train"]["rewards/margins"][-1]
    assert sum(s["margin"] for s in loss_mod.stats.values()) / 4 == pytest.approx(margins, abs=1e-4)


def test_dpo_grows_the_heldout_margin_and_writes_metrics(tmp_path):
    run = make_run(tmp_path, preference_records(16), preference_records(8, offset=16))
    cfg = tiny_cfg(tmp_path, objective="dpo", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                   evaluation_strategy="steps", eval_steps=4)
    m = train(cfg, run)
    assert m["objective"] == "dpo" and m["reference"] == "base, adapters disabled"
    assert m["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    log = [json.loads(x) for x in (tmp_path / "train/log.jsonl").read_text().splitlines()]
    evals = [x for x in log if x.get("event") == "eval"]
    assert evals[-1]["eval_margin"] > 0.3 and evals[-1]["eval_accuracy"] >= 0.75
    steps = [x for x in log if "objective" in x]
    assert {"dpo/chosen", "dpo/rejected", "dpo/margin", "dpo/accuracy"} <= steps[-1]["objective"].keys()
    assert (tmp_path / "train/preference.png").stat().st_size > 1000
    assert m["adapter"] == "adapter" and (tmp_path / "train/adapter/adapter_model.safetensors").exists()


def test_heldout_margin_before_is_zero_after_is_positive(tmp_path):
    """The margin on pairs never trained on: exactly 0 before (reference = policy), clearly > 0 after."""
    from dsft.model.adapters import load_adapter
    from dsft.model.load import load_model_and_tokenizer

    run = make_run(tmp_path, preference_records(16))
    cfg = tiny_cfg(tmp_path, objective="dpo", max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3)
    train(cfg, run)
    base, tok, _ = load_model_and_tokenizer(cfg.model)
    held, _ = encode_pairs(tok, preference_records(8, offset=40), 192)
    before = _margin(base, cfg, held, tok, adapter=None)
    after = _margin(load_adapter(base, tmp_path / "train/adapter"), cfg, held, tok, adapter=True)
    assert before["margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["margin"] > 0.2 and after["accuracy"] >= 0.75


def _margin(model, cfg, pairs, tok, *, adapter) -> dict:
    ref = Reference(model, adapters=True) if adapter else Reference(model, adapters=False)
    loss = PreferenceLoss(model, "dpo", cfg.dpo, reference=ref)
    return pair_metrics(loss, loss, pairs, micro=4, packing=True, capacity=1 << 30, pad_id=tok.pad_token_id,
                        device=torch.device("cpu"))


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_orpo_and_simpo_train_without_a_reference(tmp_path, kind):
    run = make_run(tmp_path, preference_records(8))
    cfg = tiny_cfg(tmp_path, objective=kind, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3)
    m = train(cfg, run)
    assert m["objective"] == kind and m["reference"] is None
    assert m["loss_last"] < m["loss_first"]
    assert m["margin_last"] > 0


def test_dpo_full_method_uses_a_frozen_copy(tmp_path):
    run = make_run(tmp_path, preference_records(4))
    cfg = tiny_cfg(tmp_path, objective="dpo", method="full", max_steps=2, per_device_train_batch_size=4,
                   learning_rate=1e-4)
    m = train(cfg, run)
    assert m["reference"] == "frozen copy of the base" and m["loss_first"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(("name", "objective"), [("dpo_deepseek_llm_7b", "dpo"), ("grpo_r1_distill_qwen_7b_math", "grpo")])
def test_example_configs_load(name, objective):
    from pathlib import Path

    from dsft.config import load_config
    from dsft.rewards import load_rewards

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml")
    assert cfg.train.objective == objective and cfg.train.method == "lora"
    if objective == "grpo":
        assert cfg.grpo.max_completion_length >= 1024 and len(load_rewards(cfg.grpo.rewards)) == 2


def test_r1_pairs_keep_their_reasoning_and_match_the_generation_prompt():
    """R1 templates drop a final answer's `<think>…</think>`: a pair is then encoded as the model generates it —
    the generation prompt (ending in `<think>\\n`, the same ids GRPO samples from) + the reasoning and answer."""
    from dsft.model.tokenizer import load_tokenizer
    from dsft.train.encode import IGNORE
    from dsft.train.objectives.encode import encode_prompts

    tok = load_tokenizer("deepseek-r1-distill-qwen-7b", chat_template="r1-distill-qwen")
    rec = {"id": "r1", "prompt": [{"role": "user", "content": "1+1=?"}],
           "chosen": "<think>\n一加一等于二</think>\n\n答案 \\boxed{2}", "rejected": "3"}
    pair = encode_pairs(tok, [rec], 256)[0][0]
    prompt = encode_prompts(tok, [rec], 256)[0][0].input_ids

    def labelled(side):
        return tok.decode([t for t, lab in zip(side.input_ids, side.labels, strict=True) if lab != IGNORE])

    assert tok.decode(prompt).endswith("<｜Assistant｜><think>\n") and pair.chosen.input_ids[:len(prompt)] == prompt
    assert labelled(pair.chosen) == "一加一等于二</think>\n\n答案 \\boxed{2}<｜end▁of▁sentence｜>"
    # no reasoning: R1's empty think block after the same generation prompt, exactly as the SFT encoder writes it
    assert pair.rejected.input_ids[:len(prompt)] == prompt
    assert labelled(pair.rejected) == "\n</think>\n\n3<｜end▁of▁sentence｜>"
