"""The kube module's pure parts: error mapping, retries, and reading nodes and pods."""

from __future__ import annotations

import asyncio

import kopf
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from llama4_operator import kube


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (409, kopf.TemporaryError),
        (429, kopf.TemporaryError),
        (500, kopf.TemporaryError),
        (503, kopf.TemporaryError),
        (403, kopf.TemporaryError),
        (400, kopf.PermanentError),
        (422, kopf.PermanentError),
    ],
)
def test_api_errors_map_to_kopf_errors(status: int, expected: type[Exception]) -> None:
    mapped = kube.to_kopf_error(ApiException(status=status, reason="x"), "apply RayService a/b")
    assert type(mapped) is expected
    assert "apply RayService a/b" in str(mapped)


def test_forbidden_points_at_rbac() -> None:
    assert "RBAC" in str(kube.to_kopf_error(ApiException(status=403, reason="Forbidden"), "list"))


def test_connection_errors_are_temporary() -> None:
    error = urllib3.exceptions.MaxRetryError(pool=None, url="/api")  # type: ignore[arg-type]
    assert isinstance(kube.to_kopf_error(error, "list nodes"), kopf.TemporaryError)


def test_transient_errors_are_retried_before_giving_up() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ApiException(status=503, reason="unavailable")
        return "ok"

    assert asyncio.run(kube._call("get", flaky)) == "ok"
    assert len(calls) == 3


def test_permanent_errors_are_not_retried() -> None:
    calls = []

    def invalid() -> None:
        calls.append(1)
        raise ApiException(status=422, reason="Unprocessable Entity")

    with pytest.raises(kopf.PermanentError):
        asyncio.run(kube._call("apply", invalid))
    assert len(calls) == 1


def node(name: str, gpus: str, ready: str = "True", **labels: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus, "cpu": "64"},
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def test_gpu_node_reads_the_labels_the_placement_needs() -> None:
    labels = {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "topology.kubernetes.io/zone": "zone-a",
        "llama4.dev/node-pool": "pool-0",
        "llama4.dev/nvlink-domain": "nvl-3",
    }
    found = kube.gpu_node_from(node("gpu-3", "8", **labels), gpus_used_elsewhere=2)
    assert found is not None
    assert (found.name, found.gpu_product, found.gpu_memory_mib) == (
        "gpu-3",
        "NVIDIA-H100-80GB-HBM3",
        81559,
    )
    assert (found.allocatable_gpus, found.used_gpus) == (8, 2)
    assert (found.zone, found.node_pool, found.nvlink_domain) == ("zone-a", "pool-0", "nvl-3")
    assert found.schedulable


def test_nodes_without_gpus_are_skipped_and_not_ready_ones_unschedulable() -> None:
    assert kube.gpu_node_from(node("cpu-0", "0"), 0) is None
    not_ready = kube.gpu_node_from(node("gpu-0", "8", ready="False"), 0)
    assert not_ready is not None
    assert not not_ready.schedulable


def pod(
    namespace: str, node_name: str, gpus: int, phase: str = "Running", **labels: str
) -> dict[str, object]:
    return {
        "metadata": {"namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
        "status": {"phase": phase},
    }


def test_gpus_used_by_others_leaves_out_our_pods_and_finished_ones() -> None:
    pods = [
        pod("llm", "gpu-0", 8, **{"serving.llama4.dev/deployment": "maverick"}),
        pod("llm", "gpu-0", 2, **{"serving.llama4.dev/deployment": "scout"}),
        pod("other", "gpu-1", 4),
        pod("other", "gpu-1", 4, phase="Succeeded"),
    ]
    assert kube.gpus_used_by_others(pods, [], "llm", "maverick") == {"gpu-0": 2, "gpu-1": 4}


def deployment(namespace: str, name: str, *workers: tuple[str, int]) -> dict[str, object]:
    return {
        "metadata": {"namespace": namespace, "name": name},
        "status": {
            "placement": {
                "replicas": [{"index": 0, "workers": [{"node": n, "gpus": g} for n, g in workers]}]
            }
        },
    }


def test_gpus_placed_by_other_deployments_count_before_their_pods_exist() -> None:
    # Scout placed 1 GPU on gpu-0 but its pod is not bound yet; Maverick must not take gpu-0's 8.
    deployments = [deployment("llm", "scout", ("gpu-0", 1)), deployment("llm", "maverick")]
    assert kube.gpus_used_by_others([], deployments, "llm", "maverick") == {"gpu-0": 1}
    # Once bound, its pod and its placement are the same GPUs, counted once.
    scout_pod = pod("llm", "gpu-0", 1, **{"serving.llama4.dev/deployment": "scout"})
    assert kube.gpus_used_by_others([scout_pod], deployments, "llm", "maverick") == {"gpu-0": 1}
    # Our own placement never counts against us.
    assert kube.gpus_used_by_others([], deployments, "llm", "scout") == {}


def test_only_objects_owned_by_the_deployment_are_pruned() -> None:
    ours = {"metadata": {"ownerReferences": [{"uid": "uid-1", "kind": "Llama4Deployment"}]}}
    # EndpointSlices copy our Service's labels but are owned by the Service.
    slice_of_our_service = {"metadata": {"ownerReferences": [{"uid": "svc-9", "kind": "Service"}]}}
    assert kube.owned_by(ours, "uid-1")
    assert not kube.owned_by(slice_of_our_service, "uid-1")


def test_the_node_list_is_reused_for_a_few_seconds_and_usage_is_read_every_time() -> None:
    now = [100.0]
    reads: list[str] = []
    cluster = kube.Kube(clock=lambda: now[0])

    def list_items(api_version: str, kind: str, **query: object) -> list[dict[str, object]]:
        reads.append(kind)
        return [node("gpu-0", "8")] if kind == "Node" else []

    cluster._list_items = list_items  # type: ignore[method-assign]
    for _ in range(3):
        (found,) = asyncio.run(cluster.gpu_nodes("llm", "scout"))
        assert (found.name, found.allocatable_gpus) == ("gpu-0", 8)
    assert sorted(reads) == ["Llama4Deployment"] * 3 + ["Node"] + ["Pod"] * 3
    now[0] += kube.NODE_LIST_TTL_S
    asyncio.run(cluster.gpu_nodes("llm", "scout"))
    assert reads.count("Node") == 2
