"""CLI of the 'serve' stage (arguments and printing): `dsft serve --model DIR [--port N] [--api-key K] [--lora NAME=DIR]`."""

from __future__ import annotations

import argparse
import json
import logging
import os

EXAMPLES = """examples:
  dsft serve --model runs/demo/export/merged --port 8000
  dsft serve --run runs/demo                                      # the run's merged model (or base + adapter)
  dsft serve --model embedded:tiny-deepseek-v3 --port 0           # any free port
  dsft serve --model BASE --lora medical=runs/demo/train/adapter --api-key $KEY
  dsft serve --esft runs/esft/train/esft                          # base + ESFT expert delta, no merged copy
  dsft serve --model BASE --engine vllm --tensor-parallel-size 2  # GPU, needs `pip install dsft[vllm]`
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "merged", "messages": [{"role": "user", "content": "头痛怎么办？"}]}'

exit status: 0 stopped by SIGTERM/SIGINT after every in-flight request finished; 1 the drain took longer
than serve.shutdown_timeout_s (requests were cut); 2 bad input, or the model cannot be loaded.
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: seed /generate + OpenAI-compatible API",
                       description="Serve a local model folder over HTTP: POST /generate (seed API), "
                                   "/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (safetensors) or embedded:tiny-deepseek-v3; "
                                   "a .gguf file with --engine llamacpp")
    p.add_argument("--run", metavar="RUN_DIR", help="serve a dsft run's output instead of --model: export's merged "
                                                    "model, else train's base model + its LoRA adapter")
    p.add_argument("--config", help="a dsft YAML config whose serve: section gives the defaults")
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health, /metrics and "
                                     "/openapi.json (or set $DSFT_API_KEY)")
    p.add_argument("--auth-all", action="store_true", help="with an API key, require it on /health, /metrics and "
                                                           "/openapi.json too (probes must then send it)")
    p.add_argument("--engine", choices=["transformers", "vllm", "llamacpp"], help="default transformers")
    p.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME over the base (repeatable)")
    p.add_argument("--esft", metavar="DELTA", help="serve the base (--model, default: the delta's own base) with an "
                                                   "ESFT expert delta folder applied, without a merged copy")
    p.add_argument("--max-batch-size", type=int, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--chat-template", help="DeepSeek template name overriding the tokenizer's")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM only")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM only")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings (and the vLLM command) and exit")
    p.set_defaults(func=_run)


def _settings(args):
    from dsft.serve.settings import resolve

    flags = {
        "host": args.host, "port": args.port, "api_key": args.api_key, "engine": args.engine,
        "served_model_name": args.served_model_name, "max_batch_size": args.max_batch_size,
        "max_queue": args.max_queue, "max_model_len": args.max_model_len, "dtype": args.dtype,
        "chat_template": args.chat_template, "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization, "auth_all": args.auth_all or None,
        "esft_delta": args.esft,
    }
    return resolve(model=args.model, run=args.run, config=args.config, loras=args.lora, flags=flags)


def _run(args) -> int:
    model, cfg = _settings(args)
    if cfg.engine == "vllm":
        from dsft.serve.vllm import exec_vllm

        return exec_vllm(model, cfg, dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps({"model": model, **cfg.model_dump(exclude={"api_key"})}, indent=2, ensure_ascii=False))
        return 0
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("DSFT_API_KEY")):
        logging.getLogger("dsft.serve").warning("binding %s without --api-key: anyone on the network can call it", cfg.host)
    from dsft.serve.server import serve_forever

    return serve_forever(model, cfg)
