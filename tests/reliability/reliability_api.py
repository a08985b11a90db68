"""Reads and writes of the reliability tests through the Kubernetes API (plain JSON objects), and
the check every chaos test ends with: converged, one child of each, no GPU placed twice."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from support import (
    DEPLOYMENT_LABEL,
    GROUP,
    PLURAL,
    REPO,
    VERSION,
    DeploymentsApi,
    Json,
    wait_for,
)

SAMPLES = REPO / "manifests" / "samples"
# What one deployment owns without KubeRay running (docs/api.md, "Children"): the endpoint and
# metrics Services, the expert-placement ConfigMap and the RayService.
ONE_OF_EACH = {"RayService": 1, "Service": 2, "ConfigMap": 1}
GPUS_PER_NODE = 8


def sample(name: str, new_name: str | None = None) -> Json:
    loaded: Json = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())
    if new_name:
        loaded["metadata"]["name"] = new_name
    return loaded


def conditions_of(deployment: Json) -> dict[str, Json]:
    return {c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []}


class Api(DeploymentsApi):
    """What the reliability tests write and check, on top of the reads."""

    def create(self, namespace: str, manifest: Json) -> Json:
        created: Json = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest
        )
        return created

    def patch_spec(self, namespace: str, name: str, spec: Json) -> Json:
        patched: Json = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )
        return patched

    def reconciled(self, namespace: str, name: str) -> Json | None:
        """The deployment once its status describes its current generation, else None."""
        found = self.deployment(namespace, name)
        if found is None:
            return None
        status = found.get("status") or {}
        if status.get("observedGeneration") != found["metadata"]["generation"]:
            return None
        return found if "Fits" in conditions_of(found) else None

    def children(self, namespace: str) -> Counter[tuple[str, str]]:
        """(owner, kind) -> how many objects of that kind carry the owner's label."""
        counts: Counter[tuple[str, str]] = Counter()
        services = self.core.list_namespaced_service(namespace, _preload_content=False)
        config_maps = self.core.list_namespaced_config_map(namespace, _preload_content=False)
        ray_services = self.custom.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayservices", _preload_content=False
        )
        for kind, response in (
            ("Service", services),
            ("ConfigMap", config_maps),
            ("RayService", ray_services),
        ):
            for item in json.loads(response.data)["items"]:
                owner = (item["metadata"].get("labels") or {}).get(DEPLOYMENT_LABEL)
                if owner:
                    counts[(owner, kind)] += 1
        return counts

    def ray_service(self, namespace: str, name: str) -> Json:
        found: Json = self.custom.get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayservices", name
        )
        return found

    @contextmanager
    def scratch_namespace(self, prefix: str) -> Iterator[str]:
        """A new namespace, gone afterwards. Finalizers are dropped first (the operator may be
        stopped by then, and these tests have no external Ray to clean up); the namespace
        itself goes in the background."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        try:
            yield name
        finally:
            self.release_deployments(name)
            self.core.delete_namespace(name)

    def release_deployments(self, namespace: str) -> None:
        """Delete every deployment of the namespace and drop its finalizers (test teardown)."""
        for item in self.deployments(namespace):
            name = item["metadata"]["name"]
            try:
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
                )
            except ApiException as error:
                if error.status != 404:
                    raise


def wait_all_reconciled(api: Api, namespace: str, names: list[str], timeout_s: float) -> None:
    wait_for(
        lambda: all(api.reconciled(namespace, n) for n in names),
        timeout_s,
        f"{names} in {namespace} reconciled at their current generation",
    )


def assert_converged(api: Api, namespace: str, names: list[str]) -> list[Json]:
    """Every deployment reconciled at its generation with a placement and conditions of that
    generation; exactly one of each child per owner; no GPU placed twice."""
    deployments = []
    for name in names:
        found = api.reconciled(namespace, name)
        assert found is not None, f"{name} not reconciled: {api.deployment(namespace, name)}"
        status = found["status"]
        generation = found["metadata"]["generation"]
        assert conditions_of(found)["Fits"]["status"] == "True", status
        assert {c["observedGeneration"] for c in conditions_of(found).values()} == {generation}
        assert status.get("placement"), f"{name} has no placement: {status}"
        assert status["replicas"] == found["spec"]["replicas"], status
        deployments.append(found)
    counts = api.children(namespace)
    wrong = {
        (owner, kind): counts[(owner, kind)]
        for owner in names
        for kind, expected in ONE_OF_EACH.items()
        if counts[(owner, kind)] != expected
    }
    assert not wrong, f"owners with missing or duplicate children: {wrong}"
    assert {owner for owner, _ in counts} == set(names), counts  # no orphans of other names
    per_node: Counter[str] = Counter()
    for found in deployments:
        for replica in found["status"]["placement"]["replicas"]:
            for worker in replica["workers"]:
                per_node[worker["node"]] += worker["gpus"]
    overbooked = {node: gpus for node, gpus in per_node.items() if gpus > GPUS_PER_NODE}
    assert not overbooked, f"GPUs placed twice: {overbooked}"
    return deployments
