"""Issue 7's acceptance on the real local control plane: the chart installs into a namespace that
enforces the restricted Pod Security profile, its RBAC is enough for the operator, and uninstall
leaves only what docs/install.md documents.

KWOK nodes run no containers, so the operator process runs here, authenticated AS the chart's
ServiceAccount (a token from the TokenRequest API), never with the admin kubeconfig.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_server import PrometheusApi, prometheus

from llama4_operator.devenv.cluster import LocalCluster, free_port
from support import CRD, LLAMA4CTL, REPO, Kubectl, wait_for
from support import helm as support_helm

pytestmark = pytest.mark.cluster

CHART = REPO / "helm" / "llama4-operator"
RELEASE = "l4-helm"
OPERATOR_NS = "l4-helm-system"  # where the chart goes (restricted)
WATCHED_NS = "l4-helm-models"  # the namespace the operator serves (namespaced mode)
SERVICE_ACCOUNT = f"{RELEASE}-llama4-operator"  # fullname: release + chart name
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
# Kinds the chart creates, for checking what uninstall leaves (docs/install.md keeps the CRDs).
CLUSTER_KINDS = ("clusterroles", "clusterrolebindings", "clusterkopfpeerings.kopf.dev")
NAMESPACED_KINDS = (
    "deployments",
    "services",
    "serviceaccounts",
    "rolebindings",
    "kopfpeerings.kopf.dev",
    "configmaps",
)


def helm(cluster: LocalCluster, *args: str) -> str:
    return support_helm(cluster.kubeconfig, *args, timeout_s=120)


def service_account_kubeconfig(cluster: LocalCluster, token: str, path: Path) -> Path:
    """A kubeconfig with the admin one's server and CA but the ServiceAccount's token."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in server:  # inline it: the path may be relative to the file
        ca = Path(server.pop("certificate-authority"))
        ca = ca if ca.is_absolute() else Path(cluster.kubeconfig).parent / ca
        server["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": SERVICE_ACCOUNT}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def names(kubectl: Kubectl, kind: str, namespace: str | None = None) -> list[str]:
    scope = ["-n", namespace] if namespace else []
    listed = json.loads(kubectl.run("get", kind, *scope, "-l", INSTANCE, "-o", "json"))
    return [item["metadata"]["name"] for item in listed["items"]]


@pytest.fixture(scope="module")
def namespaces(kubectl: Kubectl) -> Iterator[None]:
    """The chart's and the models' namespaces, both enforcing the restricted profile."""
    # The same server-side apply as the `operator` fixture, so whichever test runs first, the
    # CRD has one owner; helm then leaves the existing CRD alone.
    kubectl.run("apply", "--server-side", "-f", str(CRD))
    for namespace in (OPERATOR_NS, WATCHED_NS):
        kubectl.run("create", "namespace", namespace)
        kubectl.run(
            "label",
            "namespace",
            namespace,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        )
    try:
        yield
    finally:
        for namespace in (WATCHED_NS, OPERATOR_NS):
            kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


# (chart values, the operator's namespace flag), as the chart's Deployment would pass it.
MODES = {
    "namespaced": ((f"--set=watchNamespaces={{{WATCHED_NS}}}",), f"--namespace={WATCHED_NS}"),
    "cluster": ((), "--all-namespaces"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_helm_install_passes_restricted_pod_security_and_its_rbac_runs_the_operator(
    mode: str, local_cluster: LocalCluster, kubectl: Kubectl, namespaces: None, tmp_path: Path
) -> None:
    values, watch_flag = MODES[mode]
    try:
        installed = helm(local_cluster, "install", RELEASE, str(CHART), "-n", OPERATOR_NS, *values)
        # PodSecurity admission warns on the Deployment and refuses its pod when the template
        # breaks the restricted profile; a pod existing proves it was admitted.
        assert "violate PodSecurity" not in installed, installed
        wait_for(
            lambda: kubectl.run("get", "pods", "-n", OPERATOR_NS, "-l", INSTANCE, "-o", "name"),
            60,
            "the operator pod to be admitted in the restricted namespace",
        )
        log_path = tmp_path / "operator.log"
        _run_operator_as_the_chart_service_account(
            local_cluster, kubectl, tmp_path, watch_flag, log_path
        )
        log_text = log_path.read_text(errors="replace")
        assert "Forbidden" not in log_text, log_text[-4000:]
        assert " 403" not in log_text, log_text[-4000:]
        helm(local_cluster, "uninstall", RELEASE, "-n", OPERATOR_NS, "--wait")
        _assert_only_documented_leftovers(kubectl)
    finally:
        helm(local_cluster, "uninstall", RELEASE, "-n", OPERATOR_NS, "--ignore-not-found")


def _run_operator_as_the_chart_service_account(
    cluster: LocalCluster, kubectl: Kubectl, tmp_path: Path, watch_flag: str, log_path: Path
) -> None:
    token = kubectl.run("create", "token", SERVICE_ACCOUNT, "-n", OPERATOR_NS).strip()
    kubeconfig = service_account_kubeconfig(cluster, token, tmp_path / "sa.kubeconfig")
    who = json.loads(Kubectl(kubeconfig).run("auth", "whoami", "-o", "json"))
    assert who["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{OPERATOR_NS}:{SERVICE_ACCOUNT}"
    )
    metrics_port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                LLAMA4CTL,
                "operator",
                watch_flag,
                f"--kubeconfig={kubeconfig}",
                f"--metrics-port={metrics_port}",
                "--resync-interval=3",
                "--peering=llama4-operator",  # the chart's peering object (values default)
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    try:
        operator_job: tuple[str, dict[str, str]] = (f"127.0.0.1:{metrics_port}", {})
        with prometheus(tmp_path, {"llama4-operator": operator_job}) as prom:
            name = _reconcile_sample(kubectl, log_path)
            _check_operator_side_monitoring(prom, name)
        _delete_sample(kubectl, name)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _assert_only_documented_leftovers(kubectl: Kubectl) -> None:
    leftovers = {kind: names(kubectl, kind) for kind in CLUSTER_KINDS}
    leftovers |= {
        f"{kind} in {ns}": names(kubectl, kind, ns)
        for kind in NAMESPACED_KINDS
        for ns in (OPERATOR_NS, WATCHED_NS)
    }
    assert not any(leftovers.values()), leftovers
    # docs/install.md: the CRDs stay, so removing the chart never deletes users' models.
    for crd in ("llama4deployments.serving.llama4.dev", "kopfpeerings.kopf.dev"):
        kubectl.run("get", "crd", crd)


def _reconcile_sample(kubectl: Kubectl, log_path: Path) -> str:
    sample: dict[str, Any] = yaml.safe_load((REPO / "manifests/samples/scout.yaml").read_text())
    kubectl.apply(sample, WATCHED_NS)
    name = str(sample["metadata"]["name"])

    def reconciled() -> dict[str, Any] | None:
        found = kubectl.get("llama4deployment", name, WATCHED_NS)
        status = (found or {}).get("status") or {}
        if found and status.get("observedGeneration") == found["metadata"]["generation"]:
            return dict(found)
        return None

    try:
        found = wait_for(reconciled, 120, f"{WATCHED_NS}/{name} to be reconciled")
    except AssertionError:
        raise AssertionError(log_path.read_text(errors="replace")[-4000:]) from None
    fits = {c["type"]: c["status"] for c in found["status"]["conditions"]}["Fits"]
    assert fits == "True", found["status"]
    # Children (docs/api.md): the RayService and the endpoint Service, labelled with the owner.
    label = f"serving.llama4.dev/deployment={name}"
    for kind in ("rayservices.ray.io", "services"):
        listed = kubectl.run("get", kind, "-n", WATCHED_NS, "-l", label, "-o", "name")
        assert listed.strip(), f"no {kind} child of {name}"
    return name


def _delete_sample(kubectl: Kubectl, name: str) -> None:
    kubectl.run("delete", "llama4deployment", name, "-n", WATCHED_NS, "--wait=false")
    wait_for(
        lambda: kubectl.get("llama4deployment", name, WATCHED_NS) is None,
        60,
        f"{WATCHED_NS}/{name} to be deleted through the operator's finalizer",
    )


def _check_operator_side_monitoring(prom: PrometheusApi, name: str) -> None:
    """Operator-side rule and dashboard expressions run on a real Prometheus and return what the
    cluster says: the scout sample fits but cannot be Ready (KWOK pods run no Ray)."""
    job = 'job="llama4-operator"'
    wait_for(lambda: prom.query(f"up{{{job}}} == 1"), 60, "Prometheus to scrape the operator")
    # Llama4DeploymentNotReady's expression (its 15-minute `for` is too long to wait out).
    not_ready = wait_for(
        lambda: prom.query(
            f'sum(llama4_operator_deployments{{{job},condition="Ready",status="False"}}) > 0'
        ),
        60,
        "the not-ready deployment to show in the operator's metrics",
    )
    assert float(not_ready[0]["value"][1]) == 1.0
    fits = prom.query(f'llama4_operator_deployments{{{job},condition="Fits",status="True"}}')
    assert float(fits[0]["value"][1]) == 1.0
    # The MoE dashboard's planned-balance panel: a ratio in (0, 1].
    selector = f'namespace="{WATCHED_NS}", name="{name}"'
    balance = prom.query(f"llama4_operator_expert_balance_ratio{{{job}, {selector}}}")
    assert 0 < float(balance[0]["value"][1]) <= 1
    # Its rebalances panel: the counter is exported at 0 before the first rebalance.
    rebalances = prom.query(f"llama4_operator_expert_rebalances_total{{{job}, {selector}}}")
    assert float(rebalances[0]["value"][1]) == 0.0
    # The overview's GPUs and cost panels, and its ready-replicas series.
    gpus = wait_for(
        lambda: prom.query(f"llama4_operator_gpus{{{job}, {selector}}}"), 60, "the GPUs gauge"
    )
    assert float(gpus[0]["value"][1]) == 1.0  # Scout in int4 holds one H100
    ready = prom.query(f"llama4_operator_ready_replicas{{{job}, {selector}}}")
    assert float(ready[0]["value"][1]) == 0.0  # nothing runs in KWOK pods
    # Llama4OperatorMetricsMissing stays silent while the operator is up.
    assert prom.query(f"absent(up{{{job}}} == 1)") == []

    prom.wait_rules_healthy()
