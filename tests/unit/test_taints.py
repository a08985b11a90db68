"""Node taints and the spec's tolerations: fit and placement count only the nodes the scheduler
would let the Ray pods onto."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from llama4_operator import kube
from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.planners.cluster_placement import GpuNode, NodeTaint, PodToleration
from llama4_operator.renderers.children import Owner, RayPodSettings
from llama4_operator.renderers.deployment import Previous, desired_state

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner(name="maverick", namespace="llm", uid="uid-1")
SETTINGS = RayPodSettings(image="llama4-serving:test", ray_version="2.60.0")
GPU_TAINT = NodeTaint(key="nvidia.com/gpu", value="present", effect="NoSchedule")


def nodes(count: int) -> list[GpuNode]:
    return [
        GpuNode(
            name=f"gpu-{i}",
            gpu_product="NVIDIA-H100-80GB-HBM3",
            gpu_memory_mib=81559,
            allocatable_gpus=8,
            zone="zone-a",
            nvlink_domain=f"gpu-{i}",
        )
        for i in range(count)
    ]


def maverick(replicas: int, tolerations: list[dict[str, str]]) -> Llama4DeploymentSpec:
    body = yaml.safe_load((ROOT / "manifests" / "samples" / "maverick.yaml").read_text())["spec"]
    body["replicas"] = replicas
    body.setdefault("resources", {})["tolerations"] = tolerations
    return Llama4DeploymentSpec.model_validate(body)


@pytest.mark.parametrize(
    ("toleration", "tolerated"),
    [
        (PodToleration(key="nvidia.com/gpu", operator="Exists"), True),
        (PodToleration(key="nvidia.com/gpu", value="present"), True),
        (PodToleration(key="nvidia.com/gpu", value="absent"), False),
        (PodToleration(key="nvidia.com/gpu", operator="Exists", effect="NoExecute"), False),
        (PodToleration(operator="Exists"), True),  # an empty key with Exists tolerates all
        (PodToleration(key="other", operator="Exists"), False),
    ],
)
def test_toleration_matching_follows_kubernetes(toleration: PodToleration, tolerated: bool) -> None:
    assert toleration.tolerates(GPU_TAINT) is tolerated


def test_only_hard_taints_keep_pods_off() -> None:
    soft = replace(nodes(1)[0], taints=(NodeTaint("spot", "yes", "PreferNoSchedule"),))
    hard = replace(nodes(1)[0], taints=(NodeTaint("spot", "yes", "NoExecute"),))
    assert soft.tolerated_by([])
    assert not hard.tolerated_by([])
    assert hard.tolerated_by([PodToleration(key="spot", value="yes")])


def test_placement_skips_nodes_whose_taints_are_not_tolerated() -> None:
    cluster = [
        replace(node, taints=(GPU_TAINT,)) if i < 2 else node for i, node in enumerate(nodes(4))
    ]
    state = desired_state(OWNER, maverick(3, []), cluster, SETTINGS, Previous())
    assert state.placement is not None
    placed = {w.node for r in state.placement.replicas for w in r.workers}
    assert placed == {"gpu-2", "gpu-3"}
    assert state.placement.unplaced == 1

    tolerant = maverick(3, [{"key": "nvidia.com/gpu", "operator": "Exists"}])
    state = desired_state(OWNER, tolerant, cluster, SETTINGS, Previous())
    assert state.placement is not None
    assert state.placement.unplaced == 0


def test_a_cluster_of_tainted_nodes_does_not_fit_and_says_why() -> None:
    cluster = [replace(node, taints=(GPU_TAINT,)) for node in nodes(2)]
    state = desired_state(OWNER, maverick(1, []), cluster, SETTINGS, Previous())
    assert not state.fit.fits
    assert state.children == []
    assert "resources.tolerations" in state.fit.message
    assert "0 of 2 GPU nodes" in state.fit.message


def test_gpu_node_from_reads_taints() -> None:
    body = {
        "metadata": {"name": "gpu-0", "labels": {}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    found = kube.gpu_node_from(body, 0)
    assert found is not None
    assert found.taints == (GPU_TAINT,)
