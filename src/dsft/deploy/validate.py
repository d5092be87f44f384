"""Offline validation of manifests against the `kubernetes` Python client's models (unknown keys are errors)."""

from __future__ import annotations

import re
from typing import Any

from dsft.errors import DsftError

KINDS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str, "bytes": str}


class ManifestError(DsftError):
    """A generated manifest does not match the Kubernetes schema."""


def _check(value: Any, type_name: str, path: str, models) -> None:
    m = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            _check(v, m.group(1), f"{path}[{i}]", models)
        return
    m = re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name)
    if m:
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {type(value).__name__}")
        for k, v in value.items():
            _check(v, m.group(1) or m.group(2), f"{path}.{k}", models)
        return
    if type_name in _PRIMITIVES:
        want = _PRIMITIVES[type_name]
        if type_name == "int" and isinstance(value, bool) or not isinstance(value, want):
            raise ManifestError(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    cls = getattr(models, type_name, None)
    if cls is None:
        raise ManifestError(f"{path}: unknown schema type {type_name}")
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
    by_json = {j: p for p, j in cls.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            raise ManifestError(f"{path}.{key}: not a field of {type_name} (known: {', '.join(sorted(by_json))})")
        _check(v, cls.openapi_types[by_json[key]], f"{path}.{key}", models)


def validate_manifest(doc: dict[str, Any]) -> Any:
    """Check a manifest strictly (every key known, every type right) and build the client model from it.

    Kinds the client has no model for (KEDA's ScaledObject) are checked for their required structure only.
    """
    from kubernetes import client
    from kubernetes.client import models

    kind = (doc.get("apiVersion"), doc.get("kind"))
    if kind == ("keda.sh/v1alpha1", "ScaledObject"):
        spec = doc.get("spec") or {}
        if not doc.get("metadata", {}).get("name") or not spec.get("scaleTargetRef", {}).get("name") or not spec.get("triggers"):
            raise ManifestError("ScaledObject: metadata.name, spec.scaleTargetRef.name and spec.triggers are required")
        _check(doc["metadata"], "V1ObjectMeta", "ScaledObject.metadata", models)
        return doc
    if kind not in KINDS:
        raise ManifestError(f"no schema for {kind[0]} {kind[1]}")
    type_name = KINDS[kind]
    _check(doc, type_name, kind[1], models)
    # the client's own constructors enforce required fields (client_side_validation)
    try:
        return client.ApiClient()._ApiClient__deserialize(doc, type_name)
    except ValueError as err:
        raise ManifestError(f"{kind[1]}: " + " ".join(str(err).split("\n")[:3])) from err
