"""`dsft deploy k8s`: manifests validated against the kubernetes client's schemas; seed resources; vLLM variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dsft.cli import build_parser, main
from dsft.deploy.k8s import K8sOptions, manifests
from dsft.deploy.validate import ManifestError, validate_manifest


def _load(out: Path) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


def _container(docs):
    return docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]


def test_k8s_transformers_manifests(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--model", "runs/demo/export/merged", "-o", str(out), "--api-key-secret", "dsft-key"]) == 0
    docs = _load(out)
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "model-pvc.yaml", "kustomization.yaml"}
    for name, doc in docs.items():
        if name != "kustomization.yaml":
            validate_manifest(doc)
    assert sorted(docs["kustomization.yaml"]["resources"]) == sorted(n for n in docs if n != "kustomization.yaml")
    dep = docs["deployment.yaml"]
    assert dep["spec"]["replicas"] == 2
    c = _container(docs)
    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1" and res["limits"]["memory"] == "30Gi" and res["requests"]["memory"] == "20Gi"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800  # model-load sized
    pod = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert vols["model"]["persistentVolumeClaim"]["claimName"] == docs["model-pvc.yaml"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["model-pvc.yaml"]["spec"]["accessModes"]  # two pods share one model volume
    assert any(m["mountPath"] == "/models" and m["readOnly"] for m in c["volumeMounts"])
    # Service and PDB select the pods; the HPA scales this Deployment on queue length
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert docs["service.yaml"]["spec"]["selector"].items() <= labels.items()
    assert docs["pdb.yaml"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["pdb.yaml"]["spec"]["minAvailable"] == 1
    hpa = docs["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == dep["metadata"]["name"] and hpa["metrics"][0]["pods"]["metric"]["name"] == "dsft_queue_depth"
    # the API key comes from a Secret, never from the manifest
    env = {e["name"]: e for e in c["env"]}
    assert env["DSFT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "dsft-key", "key": "api-key"}
    # the container's command line is one our own CLI accepts
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    assert args.model == "/models/merged" and args.host == "0.0.0.0" and args.port == 8000


def test_k8s_vllm_variant_serves_the_same_api(tmp_path):
    out = tmp_path / "k8s-vllm"
    assert main(["deploy", "k8s", "--model", "/data/R1-distill", "--engine", "vllm", "--autoscaler", "keda",
                 "--served-model-name", "r1", "--gpus", "2", "-o", str(out)]) == 0
    docs = _load(out)
    assert "keda-scaledobject.yaml" in docs and "hpa.yaml" not in docs
    for name, doc in docs.items():
        if name != "kustomization.yaml":
            validate_manifest(doc)
    c = _container(docs)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    a = c["args"]
    assert a[a.index("--served-model-name") + 1] == "r1" and a[a.index("--port") + 1] == "8000"
    assert a[a.index("--tensor-parallel-size") + 1] == "2" and a[a.index("--max-num-seqs") + 1] == "8"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # the seed's /generate stays available: dsft's middleware inside vLLM, told the served model's name
    assert a[a.index("--middleware") + 1] == "dsft.serve.seed_compat.SeedGenerateMiddleware"
    assert {"name": "DSFT_SERVED_MODEL_NAME", "value": "r1"} in c["env"] and c["image"] == "dsft-vllm:latest"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"  # vLLM's /health: 200 once the engine is up
    trig = docs["keda-scaledobject.yaml"]["spec"]["triggers"][0]
    assert trig["type"] == "prometheus" and "vllm:num_requests_waiting" in trig["metadata"]["query"]


def test_validator_rejects_typos_and_wrong_types():
    docs = manifests(K8sOptions(model="/m/merged"))
    bad = json.loads(json.dumps(docs["deployment.yaml"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ManifestError, match="readinesProbe"):
        validate_manifest(bad)
    bad = json.loads(json.dumps(docs["service.yaml"]))
    bad["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(ManifestError, match="port"):
        validate_manifest(bad)
    bad = json.loads(json.dumps(docs["deployment.yaml"]))
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ManifestError):
        validate_manifest(bad)


def test_k8s_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["deploy", "k8s", "--model", "m", "-o", str(out)]) == 0
    assert main(["deploy", "k8s", "--model", "m", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["deploy", "k8s", "--model", "m", "-o", str(out), "--force", "--replicas", "3"]) == 0
    assert _load(out)["deployment.yaml"]["spec"]["replicas"] == 3


def test_cpu_quantities_map_to_whole_threads():
    from dsft.deploy.k8s import _threads

    assert [_threads(x) for x in ("4", "2.5", "500m", "1500m", "x")] == [4, 2, 1, 1, 1]
    docs = manifests(K8sOptions(model="/m/merged", cpu_request="2500m", gpus=0))
    c = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in c["env"] and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "tolerations" not in docs["deployment.yaml"]["spec"]["template"]["spec"]
    validate_manifest(docs["deployment.yaml"])
