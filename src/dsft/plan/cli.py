"""CLI of `dsft plan`: size GPUs and memory for a fine-tuning setup before training."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  dsft plan --model deepseek-llm-7b --method lora --seq-len 512 --batch 16 --gpu A100-40GB
  dsft plan --model deepseek-v3 --method qlora --seq-len 4096 --gpu H200 --gpus 8 --zero 3
  dsft plan --model r1-distill-qwen-7b --method full --precision amp-bf16 --gpu 24GB --json
  dsft plan --model DeepSeek-13B --method full --gpu A100-40GB     # the guide's size classes: DeepSeek-7B/13B/34B
  dsft plan --model deepseek-llm-7b --method full --gpus 2 --zero 3 --gpu A100-80GB --interconnect pcie
  dsft plan /models/DeepSeek-V3 --method lora   # a downloaded checkpoint: config.json, FP8 blocks, index, MTP
  dsft plan examples/demo.yaml                 # the setup of a dsft config (as `dsft train` runs it)
  dsft plan --model ./my-model/config.json --examples 20000 --avg-tokens 300 --mfu 0.4
  dsft plan --model deepseek-llm-7b --objective dpo --batch 4 --gpu A100-80GB    # 4 pairs = 8 sequences a forward
  dsft plan --model deepseek-llm-7b --method full --objective dpo --gpu H100     # + a frozen reference copy
  dsft plan --model deepseek-llm-7b --objective grpo --num-generations 8 --max-completion-length 512 --json
  dsft plan --model deepseek-v2-lite --objective grpo --num-generations 16 --max-completion-length 1024 --beta 0.04
  dsft plan --model deepseek-v2-lite --method esft --esft-top-p 0.2   # ESFT: only the selected experts train
"""


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="size GPUs and memory for a fine-tuning setup (per-GPU peak, verdict, batch, time)",
        description="Estimate the per-GPU peak memory of one training step (weights, adapter, gradients, optimizer "
                    "state, activations, logits/loss, overhead), say whether it fits, the largest micro-batch that "
                    "fits, the smallest 'N × GPU' that fits, recommended hyperparameters and time per epoch.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG|MODEL_DIR",
                   help="a dsft config file (flags below override it), or a downloaded model folder (its config.json, "
                        "quantization_config, model.safetensors.index.json and dtype are read)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with CONFIG), e.g. --set train.method=full")
    p.add_argument("--model", help="built-in name (deepseek-llm-7b, DeepSeek-13B, deepseek-v3, deepseek-r1, "
                                   "r1-distill-qwen-7b …), a model folder or a config.json path")
    p.add_argument("--method", help="lora | qlora | dora | full | freeze | esft (default lora)")
    p.add_argument("--seq-len", type=int, help="sequence length in tokens (default 512): one sequence — an SFT sample, "
                                               "a pair's chosen or rejected side, a GRPO prompt + completion "
                                               "(data.max_seq_length)")
    p.add_argument("--batch", "--micro-batch", dest="batch", type=int, help="micro-batch per GPU (default 1)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    p.add_argument("--precision", help="bf16 | fp16 | fp32 | amp-bf16 | amp-fp16 (amp: fp32 master weights; default bf16)")
    p.add_argument("--optimizer", help="adamw | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd (default adamw)")
    p.add_argument("--gradient-checkpointing", dest="gc", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack samples into full sequences (default on); affects tokens per epoch")
    p.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3")
    p.add_argument("--fsdp", action="store_true", help="FSDP full sharding (like ZeRO-3)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state (and ZeRO-3 params) to CPU")
    p.add_argument("--gpu", help="A100-40GB, A100-80GB, H100, H200, L40S, 4090, 3090 or a memory size like 24GB "
                                 "(default A100-80GB; with CONFIG: plan.gpu or this machine)")
    p.add_argument("--gpus", type=int, help="number of GPUs (default 1)")
    p.add_argument("--interconnect", help="link between the GPUs for multi-GPU time: nvlink | pcie | network | a rate "
                                          "such as 50GB/s or 200Gbps (default: NVLink for A100/H100/H200, else PCIe)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: the seed matrix for the model size)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1)")
    p.add_argument("--lora-targets", help="all (default: every linear PEFT targets by name) | attention | a "
                                          "comma list such as q_proj,v_proj")
    p.add_argument("--freeze-layers", type=int, help="with --method freeze: how many last layers train (default 2)")
    p.add_argument("--attn", help="sdpa | flash_attention_2 | eager (default sdpa)")
    p.add_argument("--trainer", help="dsft (the step `dsft train` runs: logits only on labelled tokens, chunked) | "
                                     "hf (a Hugging Face Trainer step: logits for every token) (default dsft)")
    p.add_argument("--label-fraction", type=float, help="share of tokens with a loss target (default 1.0)")
    p.add_argument("--objective", help="sft | dpo | orpo | simpo | grpo (train.objective; default sft). dpo/orpo/simpo: "
                                       "--batch counts pairs, each forward holds chosen + rejected (×2 sequences); "
                                       "dpo adds the reference (a frozen copy of the model under full/freeze, the "
                                       "base with adapters disabled under LoRA) and its no-grad forward. grpo: "
                                       "--batch counts prompts, each forward holds --num-generations rollouts of "
                                       "prompt + completion; generation holds the rollout KV cache")
    p.add_argument("--num-generations", type=int, help="grpo: completions sampled per prompt, G (grpo.num_generations; "
                                                       "default 8)")
    p.add_argument("--max-completion-length", type=int, help="grpo: new tokens per completion (grpo."
                                                             "max_completion_length; default 1024)")
    p.add_argument("--prompt-length", type=int, help="grpo: prompt tokens (default: what --seq-len leaves next to the "
                                                     "completion; without --seq-len or CONFIG, 512)")
    p.add_argument("--beta", type=float, help="grpo: KL coefficient (grpo.beta; default 0): > 0 adds the reference "
                                              "forward (and a frozen copy under full/freeze)")
    p.add_argument("--esft-experts", type=int, help="esft: routed experts trained per MoE layer (default: "
                                                    "ceil(--esft-top-p × routed experts))")
    p.add_argument("--esft-top-p", type=float, help="esft: share of the routed token-slots reaching the trained "
                                                    "experts (ESFT-Token's top_p; default 0.2)")
    p.add_argument("--examples", type=int, help="training examples per epoch (for tokens and time per epoch)")
    p.add_argument("--avg-tokens", type=float, help="mean tokens per example (default: seq-len); pairs: per side; "
                                                    "grpo: per prompt (completions at full length)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed for time (default 0.35)")
    p.add_argument("--tflops", type=float, help="peak TFLOPS per GPU (default: the GPU type's dense bf16 peak)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for tools)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dsft.plan.api import plan_from_options, plan_json

    plan = plan_from_options(vars(args))
    print(plan_json(plan) if args.json else plan.table())
    return 0
