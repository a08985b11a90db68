"""The local control plane is a real Kubernetes: scheduling, admission, RBAC and garbage
collection all work as in a cluster, on simulated GPU nodes."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster, port_is_bound
from llama4_operator.devenv.nodes import GPU_PRODUCT_LABEL, NVLINK_DOMAIN_LABEL, NodePool
from support import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def core(local_cluster: LocalCluster) -> client.CoreV1Api:
    return client.CoreV1Api(local_cluster.api_client())


@pytest.fixture
def namespace(core: client.CoreV1Api) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    # The service-account controller creates `default`; pods are refused until it exists.
    wait_for(
        lambda: any(
            sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items
        ),
        what="the default service account",
    )
    return name


def gpu_pod(name: str, gpus: int, **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    **container,
                }
            ]
        },
    }


def test_sixteen_ready_gpu_nodes_with_eight_gpus(core: client.CoreV1Api) -> None:
    nodes = core.list_node(label_selector="llama4.dev/simulated=true").items
    assert len(nodes) == 16
    for node in nodes:
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True", node.metadata.name
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.metadata.labels[GPU_PRODUCT_LABEL] == "NVIDIA-H100-80GB-HBM3"
        assert node.metadata.labels[NVLINK_DOMAIN_LABEL]
    assert {n.metadata.labels["topology.kubernetes.io/zone"] for n in nodes} == {"zone-a", "zone-b"}


def test_pod_requesting_eight_gpus_is_scheduled_and_runs(
    core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, gpu_pod("eight-gpus", 8))
    pod = wait_for(
        lambda: (
            (p := core.read_namespaced_pod("eight-gpus", namespace)).status.phase == "Running" and p
        ),
        what="the 8-GPU pod to run",
    )
    assert pod.spec.node_name.startswith("gpu-pool-0-")


def test_pod_asking_more_gpus_than_any_node_has_stays_pending(
    core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, gpu_pod("nine-gpus", 9))
    event = wait_for(
        lambda: [
            e
            for e in core.list_namespaced_event(namespace).items
            if e.involved_object.name == "nine-gpus" and e.reason == "FailedScheduling"
        ],
        what="a FailedScheduling event",
    )
    assert "nvidia.com/gpu" in event[0].message
    assert core.read_namespaced_pod("nine-gpus", namespace).status.phase == "Pending"


def test_restricted_pod_security_rejects_a_privileged_pod(
    core: client.CoreV1Api, namespace: str
) -> None:
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    with pytest.raises(ApiException) as rejected:
        core.create_namespaced_pod(
            namespace, gpu_pod("privileged", 1, securityContext={"privileged": True})
        )
    assert rejected.value.status == 403
    assert "violates PodSecurity" in rejected.value.body
    compliant = {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    created = core.create_namespaced_pod(
        namespace, gpu_pod("restricted", 1, securityContext=compliant)
    )
    assert created.metadata.name == "restricted"


def test_rbac_denies_a_user_without_bindings(local_cluster: LocalCluster) -> None:
    api = local_cluster.api_client()
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "spec": {
                "user": "someone",
                "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "default"},
            }
        }
    )
    assert review.status.allowed is False
    admin = client.AuthorizationV1Api(api).create_self_subject_access_review(
        {"spec": {"resourceAttributes": {"verb": "*", "resource": "*"}}}
    )
    assert admin.status.allowed is True


def test_garbage_collector_deletes_children_of_a_deleted_owner(
    core: client.CoreV1Api, namespace: str
) -> None:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        try:
            core.read_namespaced_config_map("child", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(child_gone, what="the garbage collector to delete the child")


def test_kuberay_crds_are_served(local_cluster: LocalCluster) -> None:
    groups = client.ApisApi(local_cluster.api_client()).get_api_versions().groups
    ray = next(group for group in groups if group.name == "ray.io")
    assert "v1" in [version.version for version in ray.versions]


def _processes_in(directory: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cwd").resolve() == directory.resolve():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_second_cluster_comes_up_and_leaves_nothing_behind(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    second = LocalCluster(
        ClusterConfig(
            name="second",
            pools=(NodePool(count=2, gpus_per_node=4, gpu="h200"),),
            state_dir=tmp_path / "second",
        )
    )
    second.up()
    try:
        nodes = second.nodes()
        assert [n["gpus"] for n in nodes] == [4, 4]
        assert all(n["ready"] for n in nodes)
        ports = dict(second.ports)
        pids = dict(second.running_processes())
        assert set(pids) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "kuberay-operator",
        }
        # The two clusters share nothing: the session's cluster still answers on its own port.
        assert local_cluster.ports["apiserver"] != ports["apiserver"]
    finally:
        second.down()
    assert not _processes_in(tmp_path / "second")
    assert not [port for port in ports.values() if port_is_bound(port)]
    assert not (tmp_path / "second").exists()
    with socket.create_connection(("127.0.0.1", local_cluster.ports["apiserver"]), timeout=2):
        pass
