#!/usr/bin/env bash
# GPU check for the train stage (≤ 8 minutes on one H200): bf16 LoRA on random-init DeepSeek-LLM-7B-shape and
# DeepSeek-V2-Lite-shape models, seq 1024, packed vs padded: tokens/s per GPU and peak memory; then (≤ 5 minutes)
# GRPO rollouts on vLLM (benchmarks/grpo_vllm_check.py).
# Usage (repository root, an environment with torch+CUDA, transformers ≥ 5, peft):  bash benchmarks/gpu_check.sh
# Record the printed table and the JSON line in the README's performance section with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import torch, transformers, peft
print(f"torch {torch.__version__} cuda {torch.version.cuda}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
timeout 480 "$PY" benchmarks/gpu_check.py
# GRPO rollouts on vLLM (grpo.rollout_backend: vllm): 4 steps of a tiny Llama with the colocated engine + the weight
# sync check (skips itself without vLLM's CUDA build; ≈ 2–3 minutes)
timeout 300 "$PY" benchmarks/grpo_vllm_check.py
