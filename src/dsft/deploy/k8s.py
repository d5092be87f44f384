"""Kubernetes manifests for a dsft (or vLLM) server: Deployment, Service, HPA/KEDA, PDB, model PVC, kustomization."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsft.config import ServeConfig
from dsft.errors import OverwriteError


@dataclass
class K8sOptions:
    name: str = "dsft"
    model: str = "model"
    """Local model folder (its name becomes /models/<name> in the pod)."""
    engine: str = "transformers"  # or "vllm"
    image: str | None = None
    namespace: str | None = None
    replicas: int = 2
    max_replicas: int = 4
    gpus: int = 1
    memory_limit: str = "30Gi"
    memory_request: str = "20Gi"
    cpu_request: str = "4"
    shm_size: str = "8Gi"
    port: int = 8000
    model_pvc: str = "dsft-model"
    model_pvc_size: str = "100Gi"
    storage_class: str | None = None
    startup_seconds: int = 1800
    """How long a pod may take to load the model before the startup probe gives up."""
    autoscaler: str = "hpa"  # or "keda"
    queue_target: int = 4
    """Waiting requests per pod at which the autoscaler adds pods."""
    prometheus_url: str = "http://prometheus-server.monitoring.svc:80"
    api_key_secret: str | None = None
    """Secret (key `api-key`) whose value clients must send as Bearer token."""
    serve: ServeConfig = field(default_factory=ServeConfig)

    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "dsft", "app.kubernetes.io/instance": self.name,
                "app.kubernetes.io/component": "server"}

    @property
    def model_name(self) -> str:
        return self.serve.served_model_name or Path(self.model).name or "model"

    @property
    def model_path(self) -> str:
        return f"/models/{Path(self.model).name or 'model'}"

    @property
    def queue_metric(self) -> str:
        return "vllm:num_requests_waiting" if self.engine == "vllm" else "dsft_queue_depth"


def _meta(o: K8sOptions, name: str) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "labels": o.labels()}
    if o.namespace:
        m["namespace"] = o.namespace
    return m


def _threads(cpu: str) -> int:
    """Whole CPUs in a Kubernetes CPU quantity ('4', '2.5', '500m') → OMP_NUM_THREADS (at least 1)."""
    cpu = str(cpu).strip()
    try:
        n = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:
        return 1
    return max(1, int(n))


def _container(o: K8sOptions) -> dict[str, Any]:
    s = o.serve
    env: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": str(_threads(o.cpu_request))}]
    if o.engine == "vllm":
        from dsft.model.vllm_args import VLLM_MODULE, vllm_args

        vcfg = s.model_copy(update={"host": "0.0.0.0", "port": o.port, "served_model_name": o.model_name,
                                    "tensor_parallel_size": max(1, o.gpus)})
        command = ["python3", "-m", VLLM_MODULE]
        args = vllm_args(o.model_path, vcfg)
        image = o.image or "dsft-vllm:latest"  # `dsft deploy docker --engine vllm`: vLLM image + dsft (seed /generate)
        key_env = "VLLM_API_KEY"
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        env.append({"name": "DSFT_SERVED_MODEL_NAME", "value": o.model_name})
    else:
        command = ["dsft", "serve"]
        args = ["--model", o.model_path, "--host", "0.0.0.0", "--port", str(o.port),
                "--served-model-name", o.model_name, "--max-batch-size", str(s.max_batch_size),
                "--max-queue", str(s.max_queue)]
        if s.max_model_len:
            args += ["--max-model-len", str(s.max_model_len)]
        image = o.image or "dsft:latest"
        key_env = "DSFT_API_KEY"
    if o.api_key_secret:
        env.append({"name": key_env, "valueFrom": {"secretKeyRef": {"name": o.api_key_secret, "key": "api-key"}}})
    limits: dict[str, str] = {"memory": o.memory_limit}
    requests: dict[str, str] = {"memory": o.memory_request, "cpu": o.cpu_request}
    if o.gpus:
        limits["nvidia.com/gpu"] = str(o.gpus)
        requests["nvidia.com/gpu"] = str(o.gpus)

    def probe() -> dict[str, Any]:  # a fresh dict each time (no YAML anchors in the output)
        return {"httpGet": {"path": "/health", "port": "http"}}

    return {
        "name": "server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "ports": [{"name": "http", "containerPort": o.port, "protocol": "TCP"}],
        "env": env,
        "resources": {"limits": limits, "requests": requests},
        # model load can take many minutes: the startup probe allows startup_seconds before liveness applies
        "startupProbe": {**probe(), "periodSeconds": 10, "timeoutSeconds": 5,
                         "failureThreshold": max(1, math.ceil(o.startup_seconds / 10))},
        "readinessProbe": {**probe(), "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe(), "periodSeconds": 15, "timeoutSeconds": 10, "failureThreshold": 4},
        # let the Service drop this pod before SIGTERM; the server then finishes in-flight requests
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
        "volumeMounts": [
            {"name": "model", "mountPath": "/models", "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def deployment(o: K8sOptions) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": int(o.serve.shutdown_timeout_s) + 30,
        "containers": [_container(o)],
        "volumes": [
            {"name": "model", "persistentVolumeClaim": {"claimName": o.model_pvc, "readOnly": True}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_size}},
        ],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": o.name}}},
        }]}},
    }
    if o.gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if o.engine != "vllm":
        pod_spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(o, o.name),
        "spec": {
            "replicas": o.replicas,
            "selector": {"matchLabels": o.labels()},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": o.labels(), "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(o.port), "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }


def service(o: K8sOptions) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(o, o.name),
            "spec": {"type": "ClusterIP", "selector": o.labels(),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def pdb(o: K8sOptions) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(o, o.name),
            "spec": {"minAvailable": max(1, o.replicas - 1), "selector": {"matchLabels": o.labels()}}}


def model_pvc(o: K8sOptions) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                            "resources": {"requests": {"storage": o.model_pvc_size}}}
    if o.storage_class:
        spec["storageClassName"] = o.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(o, o.model_pvc), "spec": spec}


def hpa(o: K8sOptions) -> dict[str, Any]:
    """HPA on the per-pod queue length (served to the metrics API by prometheus-adapter)."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(o, o.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.name},
            "minReplicas": o.replicas, "maxReplicas": max(o.replicas, o.max_replicas),
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": o.queue_metric.replace(":", "_")},
                "target": {"type": "AverageValue", "averageValue": str(o.queue_target)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}},
        },
    }


def keda(o: K8sOptions) -> dict[str, Any]:
    """KEDA ScaledObject on the summed queue length, straight from Prometheus."""
    query = f'sum({o.queue_metric}{{app_kubernetes_io_instance="{o.name}"}})'
    if o.engine == "vllm":
        query = f'sum({o.queue_metric}{{model_name="{o.model_name}"}})'
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(o, o.name),
        "spec": {
            "scaleTargetRef": {"name": o.name},
            "minReplicaCount": o.replicas, "maxReplicaCount": max(o.replicas, o.max_replicas),
            "cooldownPeriod": 600,
            "triggers": [{"type": "prometheus", "metadata": {
                "serverAddress": o.prometheus_url, "query": query, "threshold": str(o.queue_target)}}],
        },
    }


def manifests(o: K8sOptions) -> dict[str, dict[str, Any]]:
    """File name → manifest."""
    out = {"model-pvc.yaml": model_pvc(o), "deployment.yaml": deployment(o), "service.yaml": service(o),
           "pdb.yaml": pdb(o)}
    if o.autoscaler == "keda":
        out["keda-scaledobject.yaml"] = keda(o)
    else:
        out["hpa.yaml"] = hpa(o)
    return out


def write_k8s(o: K8sOptions, out_dir: str | Path, *, force: bool = False) -> list[Path]:
    """Write the manifests (+ kustomization.yaml) to out_dir; refuses to overwrite without force."""
    out = Path(out_dir)
    docs = manifests(o)
    names = [*docs, "kustomization.yaml"]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise OverwriteError(f"{out / existing[0]} exists (use --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in docs.items():
        p = out / name
        p.write_text(f"# generated by `dsft deploy k8s` ({o.engine} engine)\n" + yaml.safe_dump(doc, sort_keys=False),
                     encoding="utf-8")
        written.append(p)
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(docs)}
    if o.namespace:
        kust["namespace"] = o.namespace
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kust, sort_keys=False), encoding="utf-8")
    written.append(out / "kustomization.yaml")
    return written
