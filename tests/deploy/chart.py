"""Render deploy/helm/recsvc with Helm's own engine (helm-python-sdk) and look things up in the result.

Profiles are the values files in deploy/helm/profiles/, merged the way `helm -f a.yaml -f b.yaml` merges
them (maps deep-merged, everything else replaced), plus inline overrides.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "recsvc"
PROFILES_DIR = ROOT / "deploy" / "helm" / "profiles"
RELEASE = "shop"
NAMESPACE = "recs"

BUNDLE = {"publish": {"bundle": "movielens-2026-11-30"}}
ROLLBACK = {"rollback": {"request": "2026-12-01-a"}}
# Everything security turned on: mutual TLS with a write identity, both tokens, Triton over mutual TLS.
TLS = {"recsvc": {"shed": {"enabled": False},
                  "tls": {"enabled": True, "secretName": "recsvc-tls", "requireClientCert": True,
                          "writeAllowedIdentities": ["backend.shop.svc"]},
                  "auth": {"writeToken": {"secretName": "recsvc-tokens", "key": "write"},
                           "readToken": {"secretName": "recsvc-tokens", "key": "read"}}},
       "triton": {"tls": {"enabled": True, "serverSecretName": "triton-tls", "clientSecretName": "triton-client-tls",
                          "mutual": True}}}  # fmt: skip
# name -> (profile files, inline overrides). Every file in profiles/ appears at least once
# (test_every_profile_file_is_tested).
PROFILES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "defaults": ((), {}),
    "cpu-only": (("cpu-only.yaml",), {}),
    "gpu": (("gpu.yaml",), {}),
    "external-redis": (("external-redis-cluster.yaml",), {}),
    "bundled-redis": (("bundled-redis.yaml",), {}),
    "autoscaling": (("autoscaling.yaml",), {}),
    "servicemonitor": (("servicemonitor.yaml",), {}),
    "object-storage": (("object-storage.yaml",), {}),
    "quickstart": (("quickstart.yaml",), {}),
    "gpu-publish": (("gpu.yaml",), BUNDLE),
    "cpu-publish": (("cpu-only.yaml",), BUNDLE),
    "gpu-object-storage-publish": (("gpu.yaml", "object-storage.yaml"), BUNDLE),
    "cpu-object-storage-publish": (("cpu-only.yaml", "object-storage.yaml"), BUNDLE),
    "rollback": ((), ROLLBACK),
    "tls": ((), {**TLS, **BUNDLE, **ROLLBACK}),
    "tls-cpu-object-storage": (("cpu-only.yaml", "object-storage.yaml"), {**TLS, **BUNDLE}),
    "object-storage-rollback": (("object-storage.yaml",), {"rollback": {"request": "r2", "toVersion": 3}}),
    "everything": (
        ("cpu-only.yaml", "bundled-redis.yaml", "autoscaling.yaml", "servicemonitor.yaml"),
        {**BUNDLE, **ROLLBACK, "seed": {"enabled": True}, "recsvc": {"denyList": ["sku-1", "sku-2"],
                                                         "settings": {"l1_policy": "lru", "num_candidates": 200}}},
    ),
    "minimal": ((), {"networkPolicy": {"enabled": False}, "recsvc": {"pdb": {"enabled": False}, "metricsPort": 0,
                     "service": {"headless": False}}, "triton": {"pdb": {"enabled": False}},
                     "autoscaling": {"enabled": False}, "serviceAccount": {"create": False}}),
}  # fmt: skip


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: nested maps merge, any other value (lists too) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_values(name: str) -> dict[str, Any]:
    files, overrides = PROFILES[name]
    values: dict[str, Any] = {}
    for file in files:
        values = deep_merge(values, yaml.safe_load((PROFILES_DIR / file).read_text()) or {})
    return deep_merge(values, overrides)


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce (schema checked first)."""
    return _chart().render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)


@dataclass
class Manifests:
    """The objects of one rendering, and lookups over them."""

    values: dict[str, Any]
    objects: list[dict[str, Any]]
    notes: str
    merged: dict[str, Any] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        """Deployments, StatefulSets and Jobs: everything with a pod template."""
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]

    def component(self, name: str) -> dict[str, Any]:
        found = [w for w in self.workloads() if pod_labels(w).get("app.kubernetes.io/component") == name]
        assert len(found) == 1, f"expected one workload of component {name}, found {len(found)}"
        return found[0]


@functools.cache
def _rendered(values_json: str) -> Manifests:
    values = json.loads(values_json)
    out = render(values)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Manifests(values, objects, notes, _chart().merge_values(values))


def manifests(profile: str) -> Manifests:
    return _rendered(json.dumps(profile_values(profile), sort_keys=True))


def manifests_for(values: Mapping[str, Any]) -> Manifests:
    return _rendered(json.dumps(values, sort_keys=True))


# ------------------------------------------------------------------------------------------ pod helpers
def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Mapping[str, Any], *, init: bool = True) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    if init:
        yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers(workload) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name} in {workload['metadata']['name']}, found {len(found)}"
    return found[0]


def env_of(c: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> value (a string) or the valueFrom mapping."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in c.get("env", [])}


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels + matchExpressions) selects ``labels``."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
