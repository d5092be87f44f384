"""CLI of the 'serve' stage: `dsft serve --model DIR [--port N] [--api-key K] [--lora name=DIR] [--engine vllm]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading

from dsft.errors import ServeError

EXAMPLES = """examples:
  dsft serve --model runs/demo/export/merged --port 8000
  dsft serve --run runs/demo                                      # the run's merged model (or base + adapter)
  dsft serve --model embedded:tiny-deepseek-v3 --port 0           # any free port
  dsft serve --model BASE --lora medical=runs/demo/train/adapter --api-key $KEY
  dsft serve --model BASE --engine vllm --tensor-parallel-size 2  # GPU, needs `pip install dsft[vllm]`
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "merged", "messages": [{"role": "user", "content": "头痛怎么办？"}]}'
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
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set ${'DSFT_API_KEY'})")
    p.add_argument("--engine", choices=["transformers", "vllm", "llamacpp"], help="default transformers")
    p.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME over the base (repeatable)")
    p.add_argument("--max-batch-size", type=int, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--chat-template", help="DeepSeek template name overriding the tokenizer's")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM only")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM only")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings (and the vLLM command) and exit")
    p.set_defaults(func=_run)


def serve_config_from_args(args) -> tuple[str, object]:
    """Merge --config's serve: section with the flags; returns (model, ServeConfig)."""
    from pydantic import ValidationError

    from dsft.config import ServeConfig, load_config

    base = load_config(args.config).serve.model_dump() if args.config else {}
    flags = {
        "host": args.host, "port": args.port, "api_key": args.api_key, "engine": args.engine,
        "served_model_name": args.served_model_name, "max_batch_size": args.max_batch_size,
        "max_queue": args.max_queue, "max_model_len": args.max_model_len, "dtype": args.dtype,
        "chat_template": args.chat_template, "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    model = args.model
    loras = dict(base.get("lora_modules") or {})
    if args.run:
        if model:
            raise ServeError("give either --model or --run, not both")
        model, run_loras = model_from_run(args.run)
        loras.update(run_loras)
    elif not model:
        raise ServeError("dsft serve needs --model DIR (or --run RUN_DIR)")
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--lora {item!r}: expected NAME=DIR")
        loras[name] = path
    base["lora_modules"] = loras
    try:
        cfg = ServeConfig(**base)
    except ValidationError as err:
        e = err.errors()[0]
        raise ServeError(f"serve option {'.'.join(str(x) for x in e['loc'])}: {e['msg']}") from err
    return model, cfg


def model_from_run(run_dir: str) -> tuple[str, dict[str, str]]:
    """(model, {adapter name: dir}) of a run: export's merged folder, else train's base + adapter."""
    from pathlib import Path

    from dsft.run import RunDir

    run = RunDir(run_dir)
    if run.has("export"):
        m = run.read_manifest("export")
        return str((run.root / "export" / m["merged"]).resolve()), {}
    if run.has("train"):
        m = run.read_manifest("train")
        if m.get("model"):
            return str((run.root / "train" / m["model"]).resolve()), {}
        if m.get("adapter"):
            name = Path(run_dir).resolve().name or "adapter"
            return str(m["base_model"]), {name: str((run.root / "train" / m["adapter"]).resolve())}
    raise ServeError(f"{run_dir}: no export or train output to serve (run `dsft export` or `dsft train` first)")


def _run(args) -> int:
    model, cfg = serve_config_from_args(args)
    if cfg.engine == "vllm":
        from dsft.serve.vllm import exec_vllm

        return exec_vllm(model, cfg, dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps({"model": model, **cfg.model_dump(exclude={"api_key"})}, indent=2, ensure_ascii=False))
        return 0
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("DSFT_API_KEY")):
        logging.getLogger("dsft.serve").warning("binding %s without --api-key: anyone on the network can call it", cfg.host)
    return serve_forever(model, cfg)


def serve_forever(model: str, cfg) -> int:
    """Run uvicorn in the foreground until SIGINT/SIGTERM (in-flight requests finish first)."""
    import uvicorn

    from dsft.serve.app import create_app
    from dsft.serve.background import bind_socket, check_model

    model_dir = check_model(model, cfg.engine)
    sock = bind_socket(cfg.host, cfg.port, fallback_free=cfg.port == 0)
    host, port = sock.getsockname()[:2]
    app = create_app(str(model_dir), cfg)
    print(f"dsft serve: {model_dir} as '{app.state.dsft.model_id}' on http://{host}:{port} "
          f"(health: /health, OpenAI API: /v1, metrics: /metrics)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on",
                                           timeout_graceful_shutdown=int(cfg.shutdown_timeout_s)))
    state = app.state.dsft

    def watch_load() -> None:  # a model that cannot load ends the process (exit 2), not a pod stuck at 503
        state.ready.wait()
        if state.load_error:
            server.should_exit = True
        else:
            print(f"dsft serve: model loaded, ready on http://{host}:{port}", flush=True)

    threading.Thread(target=watch_load, name="dsft-load-watch", daemon=True).start()
    server.run(sockets=[sock])
    if state.load_error:
        raise ServeError(f"{model_dir}: {state.load_error}")
    return 0
