"""Cluster placement: which nodes host each replica's workers."""

from dataclasses import replace

from llama4_operator.planners.cluster_placement import (
    ClusterPlacement,
    GpuNode,
    ReplicaAssignment,
    ReplicaShape,
    WorkerAssignment,
    place_replicas,
)

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"


def node(name: str, **overrides: object) -> GpuNode:
    base = GpuNode(
        name=name,
        gpu_product=H100,
        gpu_memory_mib=81559,
        allocatable_gpus=8,
        zone="zone-a",
        node_pool="pool-0",
        nvlink_domain=name,  # HGX: each node is its own NVLink domain
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def nodes_of(placement: ClusterPlacement) -> list[list[str]]:
    return [[worker.node for worker in replica.workers] for replica in placement.replicas]


def test_matching_product_and_enough_free_gpus() -> None:
    cluster = [
        node("a100", gpu_product=A100),
        node("busy", used_gpus=6),
        node("cordoned", schedulable=False),
        node("free"),
    ]
    placement = place_replicas(cluster, ReplicaShape(H100, 4, 1), 1)
    assert nodes_of(placement) == [["free"]]
    assert placement.replicas[0].workers == (WorkerAssignment("free", 4),)
    assert placement.unplaced == 0


def test_any_product_when_none_is_asked() -> None:
    placement = place_replicas([node("a100", gpu_product=A100)], ReplicaShape(None, 8, 1), 1)
    assert nodes_of(placement) == [["a100"]]


def test_replica_kept_in_one_nvlink_domain_when_it_fits() -> None:
    # n1 and n3 share an NVLink domain (e.g. a GB200 NVL rack); n2 sorts between them by name.
    cluster = [
        node("n1", nvlink_domain="rack-1"),
        node("n2", nvlink_domain="rack-2"),
        node("n3", nvlink_domain="rack-1"),
    ]
    placement = place_replicas(cluster, ReplicaShape(H100, 8, 2), 1)
    assert nodes_of(placement) == [["n1", "n3"]]


def test_replica_kept_in_one_node_pool_when_no_domain_fits() -> None:
    cluster = [
        node("n1", node_pool="pool-0"),
        node("n2", node_pool="pool-1"),
        node("n3", node_pool="pool-1"),
    ]
    placement = place_replicas(cluster, ReplicaShape(H100, 8, 2), 1)
    assert nodes_of(placement) == [["n2", "n3"]]


def test_replicas_spread_over_zones() -> None:
    cluster = [node("a1", zone="zone-a"), node("a2", zone="zone-a"), node("b1", zone="zone-b")]
    placement = place_replicas(cluster, ReplicaShape(H100, 8, 1), 2)
    zones = {n.name: n.zone for n in cluster}
    assert {zones[names[0]] for names in nodes_of(placement)} == {"zone-a", "zone-b"}


def test_best_fit_leaves_whole_nodes_free() -> None:
    cluster = [node("empty"), node("half", used_gpus=4)]
    placement = place_replicas(cluster, ReplicaShape(H100, 4, 1), 1)
    assert nodes_of(placement) == [["half"]]


def test_deterministic_whatever_the_input_order() -> None:
    cluster = [node(f"n{i}", zone=f"zone-{i % 2}", used_gpus=i % 3) for i in range(6)]
    shape = ReplicaShape(H100, 4, 1)
    forward = place_replicas(cluster, shape, 4)
    backward = place_replicas(list(reversed(cluster)), shape, 4)
    assert forward == backward


def test_previous_assignments_still_valid_are_kept() -> None:
    cluster = [node("empty"), node("half", used_gpus=4)]
    shape = ReplicaShape(H100, 4, 1)
    # Best fit alone would choose "half"; the running replica on "empty" stays where it is.
    previous = ClusterPlacement(
        replicas=(ReplicaAssignment(0, (WorkerAssignment("empty", 4),)),), unplaced=0
    )
    assert nodes_of(place_replicas(cluster, shape, 1, previous)) == [["empty"]]


def test_previous_assignment_on_a_lost_node_is_replaced() -> None:
    previous = ClusterPlacement(
        replicas=(
            ReplicaAssignment(0, (WorkerAssignment("kept", 8),)),
            ReplicaAssignment(1, (WorkerAssignment("gone", 8),)),
        ),
        unplaced=0,
    )
    cluster = [node("kept"), node("spare")]
    placement = place_replicas(cluster, ReplicaShape(H100, 8, 1), 2, previous)
    assert [(r.index, r.workers[0].node) for r in placement.replicas] == [(0, "kept"), (1, "spare")]


def test_scale_down_keeps_the_lowest_indices() -> None:
    previous = place_replicas([node("n1"), node("n2")], ReplicaShape(H100, 8, 1), 2)
    placement = place_replicas([node("n1"), node("n2")], ReplicaShape(H100, 8, 1), 1, previous)
    assert placement.replicas == previous.replicas[:1]


def test_unplaced_replicas_come_with_an_actionable_reason() -> None:
    placement = place_replicas([node("n1")], ReplicaShape(H100, 8, 2), 1)
    assert placement.unplaced == 1
    assert placement.replicas == ()
    assert "2 node(s) with 8 free" in placement.reason
    assert "add GPU nodes" in placement.reason


def test_reason_names_the_products_found_when_none_match() -> None:
    placement = place_replicas([node("n1", gpu_product=A100)], ReplicaShape(H100, 8, 1), 1)
    assert placement.unplaced == 1
    assert A100 in placement.reason
    assert H100 in placement.reason
