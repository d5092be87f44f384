"""Eval throughput: dsft's batched left-padded generation + shared-prompt label scoring vs a one-at-a-time loop.

The peer is the loop most fine-tuning scripts use for evaluation: `model.generate` on one prompt at a time, and
one forward pass per (prompt, label). dsft's label scoring runs each prompt once and scores all labels on its
repeated KV cache; the pairwise batched scorer (left-padded (prompt, label) pairs, what dsft used before) is shown
too. Same model (the embedded tiny DeepSeek-V3, or --model DIR, e.g. the Gemma-3-270M of `make demo-real`), same
records (the packaged medical subset), same greedy settings; outputs are compared.
Prints a side-by-side table; the last line is JSON.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/eval_batched.py [--n 32] [--new-tokens 32] [--batch 8]
        [--model runs/models/gemma-3-270m --chat-template deepseek-llm]
"""

from __future__ import annotations

import argparse
import csv
import json
import time


def records(n: int) -> list[dict]:
    from dsft.model.paths import assets_dir
    from dsft.records import qa_messages

    path = assets_dir() / "data" / "medical_qa_subset.gb18030.csv"
    out = []
    with open(path, encoding="gb18030", newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), 2):
            if line % 7:  # spread over departments
                continue
            f = {"question": row["title"], "context": row["ask"], "answer": row["answer"]}
            out.append({"id": line, "messages": qa_messages(f), "fields": f, "label": row["department"]})
            if len(out) >= n:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", help="a local model folder (default: the embedded tiny DeepSeek-V3)")
    ap.add_argument("--chat-template", help="e.g. deepseek-llm for a base model without a template")
    args = ap.parse_args()

    import torch

    from dsft.config import ModelConfig
    from dsft.eval import predict as P
    from dsft.model.load import load_model_and_tokenizer
    from dsft.records import label_prompt_messages, prompt_and_reference

    torch.manual_seed(0)
    mcfg = {"dtype": "float32", **({"name_or_path": args.model} if args.model else {}),
            **({"chat_template": args.chat_template} if args.chat_template else {})}
    model, tok, _ = load_model_and_tokenizer(ModelConfig(**mcfg))
    recs = records(args.n)
    labels = sorted({r["label"] for r in recs})
    prompts = [prompt_and_reference(r)[0] for r in recs]
    cls_prompts = [label_prompt_messages(r, "{question}\n请问这个问题应该挂哪个科室？") for r in recs]
    P.generate(model, tok, prompts[:2], P.GenerationSettings(max_new_tokens=4, batch_size=2))  # warm-up

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    s_b = P.GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.batch)
    s_1 = P.GenerationSettings(max_new_tokens=args.new_tokens, batch_size=1)
    gen_b, t_gen_b = timed(lambda: P.generate(model, tok, prompts, s_b)["texts"])
    gen_1, t_gen_1 = timed(lambda: P.generate(model, tok, prompts, s_1)["texts"])
    same_gen = sum(a == b for a, b in zip(gen_b, gen_1, strict=True))
    def pairwise(batch: int):
        pairs = [(P._ids(tok, P.prompt_text(tok, m)), P._ids(tok, P.continuation_text(tok, m, lab)[1]))
                 for m in cls_prompts for lab in labels]
        res = P.continuation_logprobs(model, tok, pairs, batch_size=batch, progress=None)
        return [dict(zip(labels, (s for s, _ in res[i:i + len(labels)]), strict=True))
                for i in range(0, len(res), len(labels))]

    sc_b, t_cls_b = timed(lambda: P.label_scores(model, tok, cls_prompts, labels, progress=None))
    sc_p, t_cls_p = timed(lambda: pairwise(args.batch * 4))
    sc_1, t_cls_1 = timed(lambda: pairwise(1))
    max_diff = max(abs(a[k] - b[k]) for a, b in zip(sc_b, sc_1, strict=True) for k in a)
    same_cls = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(sc_b, sc_1, strict=True))

    rows = [("generation (s)", t_gen_1, None, t_gen_b), ("label scoring (s)", t_cls_1, t_cls_p, t_cls_b),
            ("total (s)", t_gen_1 + t_cls_1, None, t_gen_b + t_cls_b)]
    print(f"{args.n} records, {len(labels)} labels, {args.new_tokens} new tokens, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, model {args.model or 'embedded tiny DeepSeek-V3'}")
    print(f"{'':<20}{'one-at-a-time':>15}{'pairs batched':>15}{'dsft':>10}{'speed-up':>10}")
    for name, a, mid, b in rows:
        print(f"{name:<20}{a:>15.2f}{(f'{mid:.2f}' if mid is not None else '—'):>15}{b:>10.2f}{a / b:>9.2f}×")
    print(f"identical generations {same_gen}/{args.n}; identical label choices {same_cls}/{args.n}; "
          f"max |Δ log p| {max_diff:.2e}")
    print(json.dumps({"records": args.n, "labels": len(labels), "new_tokens": args.new_tokens, "batch": args.batch,
                      "model": args.model or "embedded",
                      "generation_s": {"peer": round(t_gen_1, 3), "dsft": round(t_gen_b, 3)},
                      "label_scoring_s": {"peer": round(t_cls_1, 3), "pairs_batched": round(t_cls_p, 3),
                                          "dsft": round(t_cls_b, 3)},
                      "label_speedup_vs_pairs_batched": round(t_cls_p / t_cls_b, 2),
                      "speedup_total": round((t_gen_1 + t_cls_1) / (t_gen_b + t_cls_b), 2),
                      "identical_generations": same_gen, "identical_label_choices": same_cls,
                      "max_abs_logp_diff": max_diff}))

if __name__ == "__main__":
    main()
