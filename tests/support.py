"""Helpers shared by the cluster tests: polling, the pinned kubectl, the operator as a process."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llama4_operator.devenv import operator_process as devenv_operator
from llama4_operator.devenv import tools as devtools

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
# The public contract (docs/api.md): the API of Llama4Deployment and the label of every child.
GROUP, VERSION, PLURAL = "serving.llama4.dev", "v1alpha1", "llama4deployments"
DEPLOYMENT_LABEL = "serving.llama4.dev/deployment"
LLAMA4CTL = devenv_operator.LLAMA4CTL  # the installed CLI, beside this Python

Json = dict[str, Any]


def process_running(pid: int) -> bool:
    """Whether `pid` still runs: gone or a zombie is not (an exited container process waits
    for whoever adopted it to reap it, which `down` does not control)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def llama4ctl(
    *args: str, timeout_s: float = 400, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed `llama4ctl` as a user would (`env`: its whole environment; default
    this process'); never raises on a non-zero exit."""
    return subprocess.run(
        [LLAMA4CTL, *args], capture_output=True, text=True, timeout=timeout_s, check=False, env=env
    )


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 60, what: str = "", interval_s: float = 0.25
) -> Any:
    """Poll until `condition()` is truthy; fail naming `what` otherwise. A condition that runs
    kubectl or llama4ctl costs CPU on every poll (`llama4ctl` alone about 3 s): waits for an
    engine to build on the same two cores poll seconds apart, not four times a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# kubectl's words when it never reached the API server (a 2-core machine running two vLLM
# engines under load can starve the server's TLS handshake): the call is made again.
UNREACHED = ("Unable to connect to the server", "connection refused")
KUBECTL_ATTEMPTS = 5


@dataclass
class Kubectl:
    kubeconfig: Path
    binary: Path = field(default_factory=lambda: devtools.tool("kubernetes").binary("kubectl"))

    def _kubectl(
        self, args: list[str], input: str | None, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        """One kubectl call, made again (a few times, a second apart) when it never reached the
        API server; an answer from the server, error or not, is returned as it is."""
        command = [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]

        def call() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                command, input=input, capture_output=True, text=True, timeout=timeout_s, check=False
            )

        for _ in range(KUBECTL_ATTEMPTS - 1):
            result = call()
            if result.returncode == 0 or not any(w in result.stderr for w in UNREACHED):
                return result
            time.sleep(1)
        return call()

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = self._kubectl(list(args), input, 120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout if check else result.stdout + result.stderr

    def apply(self, manifest: dict[str, Any] | str, namespace: str, check: bool = True) -> str:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.run("apply", "-n", namespace, "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        result = self._kubectl(["get", kind, name, "-n", namespace, "-o", "yaml"], None, 60)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name} failed: {result.stderr}")
        loaded: dict[str, Any] = yaml.safe_load(result.stdout)
        return loaded


@dataclass
class OperatorProcess(devenv_operator.OperatorProcess):
    """The operator as users run it, resyncing often so tests converge fast."""

    resync_interval_s: float | None = 3


class DeploymentsApi:
    """Llama4Deployments through the Kubernetes API (faster than a kubectl process per poll),
    as plain JSON objects, camelCase like kubectl's."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def deployment(self, namespace: str, name: str) -> Json | None:
        try:
            response = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        found: Json = json.loads(response.data)
        return found

    def deployments(self, namespace: str) -> list[Json]:
        response = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _preload_content=False
        )
        items: list[Json] = json.loads(response.data)["items"]
        return items


def helm(kubeconfig: Path, *args: str, timeout_s: float = 300) -> str:
    """The pinned helm against a cluster; fails the test with helm's message."""
    result = subprocess.run(
        [str(devtools.tool("helm").binary()), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed: {result.stderr}"
    return result.stdout + result.stderr
