"""Real kubelet nodes in the local cluster: pods scheduled there run under containerd and runc,
with logs, exec, a pod network and ClusterIP Services (kube-proxy), the node counts as a GPU node,
and `down` leaves nothing on the host. The operator, installed by Helm from the image built here,
runs there as pods: restricted, live, and the standby takes over when the active one is killed."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llama4_operator.devenv import images, real_nodes
from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from llama4_operator.devenv.nodes import GPU_PRODUCT_LABEL, NodePool
from llama4_operator.handlers.status import pod_ready
from support import REPO, Kubectl, process_running, wait_for
from support import helm as support_helm

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        ClusterConfig(
            name="real",
            pools=(NodePool(count=2),),
            kuberay=True,  # the operator's RayServices need KubeRay's CRDs
            real_nodes=1,
            state_dir=tmp_path_factory.mktemp("real-cluster"),
        )
    )
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def kubectl(real_cluster: LocalCluster) -> Kubectl:
    return Kubectl(real_cluster.kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> str:
    name = f"real-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", name)
    wait_for(
        lambda: kubectl.get("serviceaccount", "default", name), what="the default service account"
    )
    return name


def shell_pod(
    name: str, command: str, *, gpus: int = 0, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "nodeSelector": {real_nodes.REAL_NODE_LABEL: "true"},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": images.SHELL_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", command],
                    "resources": resources,
                }
            ],
        },
    }


def wait_running(kubectl: Kubectl, namespace: str, *names: str) -> None:
    kubectl.run(
        "wait",
        "--for=condition=Ready",
        "--timeout=90s",
        "-n",
        namespace,
        *(f"pod/{name}" for name in names),
    )


def test_real_node_is_a_ready_gpu_node_run_by_containerd(real_cluster: LocalCluster) -> None:
    [node] = real_cluster.nodes(real=True)
    assert node["ready"]
    assert node["gpus"] == 8
    assert node["labels"][GPU_PRODUCT_LABEL] == "NVIDIA-H100-80GB-HBM3"
    assert node["labels"]["llama4.dev/node-pool"] == "real"
    # Simulated nodes are listed apart; the real one is not among them.
    assert node["name"] not in {n["name"] for n in real_cluster.nodes()}
    with real_cluster._admin_http() as client:
        info = client.get(f"/api/v1/nodes/{node['name']}").json()["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"] == "containerd://2.4.2"
    assert info["kubeletVersion"] == "v1.36.3"


def test_pod_runs_with_logs_exec_and_a_cluster_ip_service(
    real_cluster: LocalCluster, kubectl: Kubectl, namespace: str
) -> None:
    server = shell_pod(
        "web",
        "echo hello-from-a-real-pod > /tmp/index.html; echo serving; httpd -f -p 8080 -h /tmp",
        gpus=1,
        labels={"app": "web"},
    )
    client = shell_pod("client", "sleep 3600")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    for manifest in (server, client, service):
        kubectl.apply(manifest, namespace)
    wait_running(kubectl, namespace, "web", "client")

    assert "serving" in kubectl.run("logs", "-n", namespace, "web")
    assert kubectl.run("exec", "-n", namespace, "client", "--", "hostname").strip() == "client"
    pod = kubectl.get("pod", "web", namespace)
    assert pod is not None
    assert pod["spec"]["nodeName"] == "real-node-0"
    pod_ip = pod["status"]["podIP"]
    service_object = kubectl.get("service", "web", namespace)
    assert service_object is not None
    cluster_ip: str = service_object["spec"]["clusterIP"]

    def fetch(address: str, port: int) -> str:
        request = f'printf "GET /index.html HTTP/1.0\\r\\n\\r\\n" | nc -w 5 {address} {port}'
        return kubectl.run("exec", "-n", namespace, "client", "--", "sh", "-c", request)

    # Through kube-proxy's Service rules, and pod to pod directly.
    wait_for(lambda: "hello-from-a-real-pod" in fetch(cluster_ip, 80), what="the ClusterIP answer")
    assert "hello-from-a-real-pod" in fetch(pod_ip, 8080)
    # The host (where the operator and Ray clients run in external mode) reaches pods too.
    assert httpx.get(f"http://{pod_ip}:8080/index.html", timeout=5).text.strip() == (
        "hello-from-a-real-pod"
    )
    # Cluster DNS (CoreDNS behind the `kube-dns` Service) names Services.
    looked_up = kubectl.run(
        "exec", "-n", namespace, "client", "--",
        "nslookup", f"web.{namespace}.svc.cluster.local",
    )  # fmt: skip
    assert cluster_ip in looked_up, looked_up
    # Pods reach the API server through the `kubernetes` Service.
    assert "open" in kubectl.run(
        "exec",
        "-n",
        namespace,
        "client",
        "--",
        "sh",
        "-c",
        "echo | nc -w 5 10.96.0.1 443 && echo open",
    )


def test_gpus_are_accounted_on_the_real_node(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(shell_pod("too-big", "sleep 3600", gpus=9), namespace)

    def unschedulable() -> bool:
        pod = kubectl.get("pod", "too-big", namespace) or {}
        conditions = pod.get("status", {}).get("conditions") or []
        return any(
            c["type"] == "PodScheduled" and "nvidia.com/gpu" in c.get("message", "")
            for c in conditions
        )

    wait_for(unschedulable, what="too-big Pending for Insufficient nvidia.com/gpu")


def _host_state(network: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    listed = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    links = json.loads(listed.stdout)
    names = {link["ifname"] for link in links}
    prefixes = [Path(n["directory"]) for n in nodes] + [Path(n["sockets"]) for n in nodes]
    return {
        "links": sorted(names & {network["bridge"], *(n["veth"] for n in nodes)}),
        "netns": [n["netns"] for n in nodes if Path("/run/netns", n["netns"]).exists()],
        "mounts": real_nodes.mounts_under(prefixes),
        "cgroups": [
            str(h / n["cgroup_parent"].lstrip("/"))
            for h in real_nodes.cgroup_hierarchies()
            for n in nodes
            if (h / n["cgroup_parent"].lstrip("/")).exists()
        ],
        "directories": [
            path for n in nodes for path in (n["sockets"], n["directory"]) if Path(path).exists()
        ],
    }


def test_down_leaves_no_container_mount_namespace_or_interface(tmp_path: Path) -> None:
    cluster = LocalCluster(
        ClusterConfig(
            name="real-down",
            pools=(NodePool(count=1),),
            kuberay=False,
            real_nodes=1,
            state_dir=tmp_path / "real-down",
        )
    )
    cluster.up()
    try:
        kubectl = Kubectl(cluster.kubeconfig)
        wait_for(lambda: kubectl.get("serviceaccount", "default", "default"), what="default SA")
        kubectl.apply(shell_pod("sleeper", "sleep 3600", gpus=1), "default")
        wait_running(kubectl, "default", "sleeper")
        state = json.loads((tmp_path / "real-down" / "processes.json").read_text())
        before = _host_state(state["node_network"], state["real_nodes"])
        assert all(before[key] for key in ("links", "netns", "mounts", "cgroups")), before
        container_pids = real_nodes.cgroup_processes(
            real_nodes.node_from_record(state["real_nodes"][0])
        )
        assert container_pids, "the pod's processes run in the node's cgroups"
    finally:
        cluster.down()
    after = _host_state(state["node_network"], state["real_nodes"])
    assert after == {"links": [], "netns": [], "mounts": [], "cgroups": [], "directories": []}
    still_running = [pid for pid in container_pids if process_running(pid)]
    assert not still_running, f"container processes outlived down: {still_running}"
    assert not (tmp_path / "real-down").exists()


OPERATOR_NS = "llama4-system"
MODELS_NS = "models"
RELEASE = "l4"
OPERATOR_LABEL = f"app.kubernetes.io/instance={RELEASE}"


def helm(cluster: LocalCluster, *args: str) -> str:
    return support_helm(cluster.kubeconfig, *args)


def operator_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    listed = kubectl.run("get", "pods", "-n", OPERATOR_NS, "-l", OPERATOR_LABEL, "-o", "json")
    pods: list[dict[str, Any]] = json.loads(listed)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    return pod_ready(pod.get("status") or {})


def test_helm_installed_operator_runs_on_the_real_node_and_its_standby_takes_over(
    real_cluster: LocalCluster, kubectl: Kubectl
) -> None:
    image = images.operator_image()
    real_cluster.load_image(image.archive)
    repository, tag = image.name.rsplit(":", 1)
    kubectl.run("create", "namespace", OPERATOR_NS)
    kubectl.run("label", "namespace", OPERATOR_NS, "pod-security.kubernetes.io/enforce=restricted")
    kubectl.run("create", "namespace", MODELS_NS)
    installed = helm(
        real_cluster,
        "install", RELEASE, str(REPO / "helm" / "llama4-operator"), "-n", OPERATOR_NS,
        f"--set=image.repository={repository}",
        f"--set=image.tag={tag}",
        "--set=image.pullPolicy=Never",
        f"--set-json=nodeSelector={json.dumps({real_nodes.REAL_NODE_LABEL: 'true'})}",
        "--set=operator.resyncIntervalSeconds=5",
    )  # fmt: skip
    assert "violate PodSecurity" not in installed, installed
    # Two replicas, restricted, both Ready on the real node (the kubelet runs their probes).
    wait_for(
        lambda: len([p for p in operator_pods(kubectl) if ready(p)]) == 2,
        180,
        "both operator pods Ready",
    )
    pods = operator_pods(kubectl)
    assert {p["spec"]["nodeName"] for p in pods} == {"real-node-0"}
    [container] = pods[0]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in pods)
    # `helm test`: a pod without a service-account token scrapes the operator's metrics Service.
    assert "Phase:          Succeeded" in helm(
        real_cluster, "test", RELEASE, "-n", OPERATOR_NS, "--timeout=120s"
    )

    sample: dict[str, Any] = yaml.safe_load((REPO / "manifests/samples/scout.yaml").read_text())
    kubectl.apply(sample, MODELS_NS)
    name = sample["metadata"]["name"]
    label = f"serving.llama4.dev/deployment={name}"

    def ray_services() -> list[str]:
        listed = kubectl.run(
            "get", "rayservices.ray.io", "-n", MODELS_NS, "-l", label, "-o", "name"
        )
        return listed.split()

    [ray_service] = wait_for(ray_services, 120, "the RayService the operator pod renders")
    # The chart turns the NetworkPolicy around the Ray head on: the dashboard is the operator's.
    policy = kubectl.get("networkpolicy", f"{name}-ray-head", MODELS_NS)
    assert policy is not None, "no NetworkPolicy around the Ray head"
    dashboard_rule = policy["spec"]["ingress"][1]
    assert dashboard_rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert dashboard_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": OPERATOR_NS
    }

    # Kill the acting operator (the highest peering priority), then drift: the standby repairs it.
    peers = json.loads(
        kubectl.run("get", "clusterkopfpeering", "llama4-operator", "-o", "jsonpath={.status}")
    )
    active = max(peers, key=lambda peer: peers[peer]["priority"])
    assert active in {p["metadata"]["name"] for p in pods}
    kubectl.run("delete", "pod", active, "-n", OPERATOR_NS, "--grace-period=0", "--force")
    kubectl.run("delete", ray_service, "-n", MODELS_NS, "--wait=true")
    assert wait_for(ray_services, 180, "the deleted RayService to be recreated by the standby")
    standby = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"] != active)
    assert "Resuming operations" in kubectl.run("logs", "-n", OPERATOR_NS, standby)
