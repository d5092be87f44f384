"""CLI of the 'deploy' stage: `dsft deploy k8s …` (manifests) and `dsft deploy docker …` (Dockerfile)."""

from __future__ import annotations

import argparse

from dsft.errors import DsftError

EXAMPLES = """examples:
  dsft deploy k8s --model runs/demo/export/merged -o deploy/k8s
  dsft deploy k8s --model /data/DeepSeek-R1-Distill-Qwen-7B --engine vllm --autoscaler keda -o deploy/k8s-vllm
  dsft deploy docker --model runs/demo/export/merged -o deploy/docker
  kubectl apply -k deploy/k8s
"""


def register(sub) -> None:
    p = sub.add_parser("deploy", help="write Kubernetes manifests or a Dockerfile for serving a model",
                       description="Write deployment files for `dsft serve` (or vLLM, same API).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="deploy_cmd", metavar="TARGET")

    def common(q):
        q.add_argument("--model", required=True, help="model folder; pods see it as /models/<folder name>")
        q.add_argument("-o", "--out", required=True, help="output folder")
        q.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
        q.add_argument("--config", help="dsft YAML whose serve: section gives batch size, queue, LoRA, model name")
        q.add_argument("--served-model-name")
        q.add_argument("--port", type=int, default=8000)
        q.add_argument("--force", action="store_true", help="overwrite existing files")

    k = dsub.add_parser("k8s", help="Deployment, Service, HPA/KEDA, PDB, model PVC, kustomization",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(k)
    k.add_argument("--name", default="dsft")
    k.add_argument("--namespace")
    k.add_argument("--image", help="default dsft:latest (vLLM: vllm/vllm-openai:latest)")
    k.add_argument("--replicas", type=int, default=2)
    k.add_argument("--max-replicas", type=int, default=4)
    k.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu per pod (0 for CPU)")
    k.add_argument("--memory-limit", default="30Gi")
    k.add_argument("--memory-request", default="20Gi")
    k.add_argument("--cpu-request", default="4")
    k.add_argument("--shm-size", default="8Gi")
    k.add_argument("--model-pvc", default="dsft-model")
    k.add_argument("--model-pvc-size", default="100Gi")
    k.add_argument("--storage-class")
    k.add_argument("--startup-seconds", type=int, default=1800, help="model-load time allowed by the startup probe")
    k.add_argument("--autoscaler", choices=["hpa", "keda"], default="hpa")
    k.add_argument("--queue-target", type=int, default=4, help="waiting requests per pod that trigger scale-up")
    k.add_argument("--prometheus-url", default="http://prometheus-server.monitoring.svc:80", help="for KEDA")
    k.add_argument("--api-key-secret", help="Secret with key 'api-key'; clients must send it as Bearer token")
    k.set_defaults(func=_k8s)

    d = dsub.add_parser("docker", help="Dockerfile (+ .dockerignore) for the server image",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(d)
    d.add_argument("--bake-model", metavar="PATH_IN_CONTEXT", help="COPY this model folder (relative to the build "
                                                                    "context) into the image instead of mounting it")
    d.set_defaults(func=_docker)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _serve_cfg(args):
    from pathlib import Path

    from dsft.config import ServeConfig, load_config

    if args.config and Path(args.config).is_dir():
        raise DsftError(f"--config {args.config}: is a directory; expected a dsft YAML file")
    cfg = load_config(args.config).serve if args.config else ServeConfig()
    if args.served_model_name:
        cfg = cfg.model_copy(update={"served_model_name": args.served_model_name})
    return cfg


def _k8s(args) -> int:
    from dsft.deploy.k8s import K8sOptions, manifests, write_k8s

    if args.replicas < 1 or args.max_replicas < 1 or args.gpus < 0:
        raise DsftError("--replicas and --max-replicas must be ≥ 1, --gpus ≥ 0")
    o = K8sOptions(
        name=args.name, model=args.model, engine=args.engine, image=args.image, namespace=args.namespace,
        replicas=args.replicas, max_replicas=args.max_replicas, gpus=args.gpus, memory_limit=args.memory_limit,
        memory_request=args.memory_request, cpu_request=args.cpu_request, shm_size=args.shm_size, port=args.port,
        model_pvc=args.model_pvc, model_pvc_size=args.model_pvc_size, storage_class=args.storage_class,
        startup_seconds=args.startup_seconds, autoscaler=args.autoscaler, queue_target=args.queue_target,
        prometheus_url=args.prometheus_url, api_key_secret=args.api_key_secret, serve=_serve_cfg(args),
    )
    try:
        import kubernetes  # noqa: F401  (the schema source; a dev extra)

        from dsft.deploy.validate import validate_manifest
    except ImportError:
        validate_manifest = None
        print("note: manifests not checked against the Kubernetes schemas (pip install kubernetes to check them)")
    if validate_manifest is not None:
        for doc in manifests(o).values():
            validate_manifest(doc)
    for p in write_k8s(o, args.out, force=args.force):
        print(p)
    print(f"apply with: kubectl apply -k {args.out}   (copy the model into PVC '{o.model_pvc}' under /{o.model_path.split('/')[-1]})")
    return 0


def _docker(args) -> int:
    from dsft.deploy.docker import write_docker

    for p in write_docker(args.model, args.out, force=args.force, serve=_serve_cfg(args), engine=args.engine,
                          port=args.port, bake_model=args.bake_model, rel=args.out):
        print(p)
    return 0
