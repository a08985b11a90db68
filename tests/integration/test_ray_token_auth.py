"""External-Ray mode against a Ray cluster with token authentication on (RAY_AUTH_MODE=token),
every component real: the operator reads the token from the file `--ray-auth-token-file` names
(a mounted Secret in the chart) on every call. A wrong token is a `RayAuthenticationFailed`
condition, not a silent retry loop; once the file holds the right token (a rotated Secret, no
restart) the operator deploys, scales and deletes through the authenticated dashboard. Deleting
a resource while the token is refused does not hang: it goes, with a Warning event.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ray_serve import RayServe, ray_serve_cluster

from llama4_operator.devenv.cluster import LocalCluster
from llama4_operator.renderers.children import Owner, external_app_name, external_route_prefix
from llama4_serving.tiny import write_tokenizer
from support import REPO, Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

NAMESPACE = "ray-token"
NAME = "tiny"
OWNER = Owner(name=NAME, namespace=NAMESPACE, uid="-")
APP = external_app_name(OWNER)
TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="module")
def ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    with ray_serve_cluster(tmp_path_factory.mktemp("serve"), auth_token=TOKEN) as cluster:
        yield cluster


def manifest(tokenizer: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "tiny-reference.yaml").read_text()
    )
    document["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = document["spec"]
    spec["model"]["weights"]["tokenizerPath"] = str(tokenizer)
    spec["engine"]["extraArgs"] = {"replica_num_cpus": "0.5", "torch_threads": "1"}
    return document


def ready(kubectl: Kubectl) -> dict[str, Any]:
    found = kubectl.get("l4d", NAME, NAMESPACE) or {}
    conditions = (found.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_the_operator_authenticates_to_a_token_protected_ray(
    local_cluster: LocalCluster,
    kubectl: Kubectl,
    operator: OperatorProcess,
    ray: RayServe,
    tmp_path: Path,
) -> None:
    unauthenticated = httpx.get(f"{ray.dashboard}/api/serve/applications/", timeout=10)
    assert unauthenticated.status_code == 401, "the cluster does not ask for a token"
    token_file = tmp_path / "ray-token"
    token_file.write_text("not-the-token\n")
    tokenizer = tmp_path / "tokenizer"
    write_tokenizer(tokenizer, 512)
    # The session's operator (RayService mode) would act on this resource too: pause it.
    operator.stop()
    external = OperatorProcess(
        local_cluster.kubeconfig,
        tmp_path,
        extra_args=(
            f"--external-ray-dashboard={ray.dashboard}",
            f"--ray-auth-token-file={token_file}",
            "--ray-accelerator-resource=fake_gpu",
        ),
    )
    external.start()
    try:
        kubectl.run("create", "namespace", NAMESPACE, check=False)
        kubectl.apply(manifest(tokenizer), NAMESPACE)
        refused = wait_for(
            lambda: (c := ready(kubectl)).get("reason") == "RayAuthenticationFailed" and c,
            60,
            "the RayAuthenticationFailed condition",
        )
        # Ray answers a wrong token with 403 (a missing one with 401).
        assert f"refused the token from {token_file} (403" in refused["message"], refused
        assert not ray.application(APP), "an application was deployed with a refused token"

        token_file.write_text(TOKEN + "\n")  # the Secret rotated: no restart needed
        wait_for(
            lambda: ready(kubectl).get("status") == "True", 420, f"{NAME} Ready with the token"
        )
        base = f"{ray.serve_url}{external_route_prefix(OWNER)}"
        reply = httpx.post(
            f"{base}/v1/completions",
            json={"model": "tiny-llama4", "prompt": "Hello", "max_tokens": 4},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text

        kubectl.run("scale", "l4d", NAME, "-n", NAMESPACE, "--replicas=2")
        wait_for(lambda: len(ray.engine_replica_ids(APP)) == 2, 300, "2 LLMServer replicas")
        kubectl.run("scale", "l4d", NAME, "-n", NAMESPACE, "--replicas=1")
        wait_for(lambda: len(ray.engine_replica_ids(APP)) == 1, 180, "1 LLMServer replica")

        kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true")
        wait_for(lambda: not ray.application(APP), 60, "the application to be removed")

        # A resource deleted while the token is refused goes, and says what stays on Ray.
        token_file.write_text("not-the-token\n")
        kubectl.apply(manifest(tokenizer), NAMESPACE)
        wait_for(
            lambda: ready(kubectl).get("reason") == "RayAuthenticationFailed",
            60,
            "the RayAuthenticationFailed condition again",
        )
        kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true")
        events = kubectl.run(
            "get", "events", "-n", NAMESPACE, "--field-selector=reason=RayAuthenticationFailed"
        )
        assert "may be left on the Ray cluster" in events, events
        assert "Traceback" not in external.log(), external.log()[-3000:]
    finally:
        kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true", check=False)
        external.stop()
        operator.start()
