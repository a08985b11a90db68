"""Cluster placement: which GPU nodes host the workers of each model replica.

A replica has `nodes_per_replica` workers, one per node, each using `gpus_per_node` GPUs of one
product. For every replica the planner picks nodes with that product and enough free GPUs, and
prefers, in this order:
1. keeping the replica inside one NVLink domain, else inside one node pool, where it fits (tensor-
   and expert-parallel traffic stays on the fastest links);
2. spreading replicas over zones (failure domains), the zone with the fewest of our replicas first;
3. little fragmentation: the nodes left with the fewest free GPUs after placement (best fit), so
   whole nodes stay free for the next replica or another workload;
4. names, so the result is deterministic.
Replicas of a previous placement that are still valid (nodes eligible, same shape, enough GPUs)
keep their nodes and index, so a re-plan never moves a running replica without need.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Taint effects that keep a pod off a node unless tolerated (PreferNoSchedule only discourages).
_HARD_TAINT_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


@dataclass(frozen=True)
class NodeTaint:
    """A node taint (core/v1 Taint)."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class PodToleration:
    """A pod toleration (core/v1 Toleration), with Kubernetes' matching rules."""

    key: str = ""  # empty with operator Exists: every key
    operator: str = "Equal"  # Equal or Exists
    value: str = ""
    effect: str = ""  # empty: every effect

    def tolerates(self, taint: NodeTaint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and self.value == taint.value


@dataclass(frozen=True)
class GpuNode:
    name: str
    gpu_product: str  # label nvidia.com/gpu.product
    gpu_memory_mib: int  # label nvidia.com/gpu.memory
    allocatable_gpus: int  # status.allocatable["nvidia.com/gpu"]
    used_gpus: int = 0  # GPUs requested by pods already bound there that are not ours
    zone: str = ""  # topology.kubernetes.io/zone
    node_pool: str = ""  # llama4.dev/node-pool
    nvlink_domain: str = ""  # llama4.dev/nvlink-domain
    schedulable: bool = True
    labels: tuple[tuple[str, str], ...] = ()  # all node labels, for spec.resources.nodeSelector
    taints: tuple[NodeTaint, ...] = ()  # spec.taints, for spec.resources.tolerations

    def matches(self, selector: Mapping[str, str]) -> bool:
        """Whether a pod with this nodeSelector may land here."""
        labels = dict(self.labels)
        return all(labels.get(key) == value for key, value in selector.items())

    def tolerated_by(self, tolerations: Sequence[PodToleration]) -> bool:
        """Whether a pod with these tolerations may land here: every NoSchedule and NoExecute
        taint is tolerated, as the scheduler's TaintToleration filter requires."""
        return all(
            any(t.tolerates(taint) for t in tolerations)
            for taint in self.taints
            if taint.effect in _HARD_TAINT_EFFECTS
        )


@dataclass(frozen=True)
class ReplicaShape:
    gpu_product: str | None  # None: any product
    gpus_per_node: int  # GPUs each worker (one worker per node) uses
    nodes_per_replica: int


@dataclass(frozen=True)
class WorkerAssignment:
    node: str
    gpus: int


@dataclass(frozen=True)
class ReplicaAssignment:
    index: int
    workers: tuple[WorkerAssignment, ...]


@dataclass(frozen=True)
class ClusterPlacement:
    replicas: tuple[ReplicaAssignment, ...]
    unplaced: int  # replicas that could not be placed
    reason: str = ""  # why, in words a user can act on, when unplaced > 0


# Locality levels, best first: the node label that groups a replica's workers ("" = no grouping).
_LOCALITY_LEVELS = ("nvlink_domain", "node_pool", "")


def place_replicas(
    nodes: Sequence[GpuNode],
    shape: ReplicaShape,
    replicas: int,
    previous: ClusterPlacement | None = None,
) -> ClusterPlacement:
    """Assign `replicas` replicas of `shape` to `nodes`; see the module docstring for the order
    of preferences."""
    if shape.gpus_per_node < 1 or shape.nodes_per_replica < 1:
        raise ValueError("gpus_per_node and nodes_per_replica must be at least 1")
    if replicas < 0:
        raise ValueError(f"replicas must be 0 or more, got {replicas}")
    by_name = {node.name: node for node in nodes}
    free = {node.name: node.allocatable_gpus - node.used_gpus for node in nodes}
    eligible = {node.name for node in nodes if _eligible(node, shape)}
    zone_count: Counter[str] = Counter()
    placed: dict[int, ReplicaAssignment] = {}

    for kept in previous.replicas if previous else ():
        if kept.index >= replicas or not _still_valid(kept, shape, eligible, free):
            continue
        placed[kept.index] = kept
        for worker in kept.workers:
            free[worker.node] -= worker.gpus
            zone_count[by_name[worker.node].zone] += 1

    for index in range(replicas):
        if index in placed:
            continue
        choice = _best_nodes([by_name[name] for name in sorted(eligible)], shape, free, zone_count)
        if choice is None:
            break
        placed[index] = ReplicaAssignment(
            index, tuple(WorkerAssignment(node.name, shape.gpus_per_node) for node in choice)
        )
        for node in choice:
            free[node.name] -= shape.gpus_per_node
            zone_count[node.zone] += 1

    unplaced = replicas - len(placed)
    reason = "" if unplaced == 0 else _why_unplaced(nodes, shape, unplaced, free, eligible)
    return ClusterPlacement(
        replicas=tuple(placed[index] for index in sorted(placed)),
        unplaced=unplaced,
        reason=reason,
    )


def _eligible(node: GpuNode, shape: ReplicaShape) -> bool:
    return node.schedulable and (shape.gpu_product in (None, node.gpu_product))


def _still_valid(
    replica: ReplicaAssignment, shape: ReplicaShape, eligible: set[str], free: dict[str, int]
) -> bool:
    names = [worker.node for worker in replica.workers]
    return (
        len(replica.workers) == shape.nodes_per_replica
        and len(set(names)) == len(names)
        and all(worker.gpus == shape.gpus_per_node for worker in replica.workers)
        and all(name in eligible and free[name] >= shape.gpus_per_node for name in names)
    )


def _best_nodes(
    candidates: list[GpuNode],
    shape: ReplicaShape,
    free: dict[str, int],
    zone_count: Counter[str],
) -> tuple[GpuNode, ...] | None:
    """The best set of nodes for one more replica, or None when no set fits."""
    fitting = [node for node in candidates if free[node.name] >= shape.gpus_per_node]
    best: tuple[tuple[int, int, int, tuple[str, ...]], tuple[GpuNode, ...]] | None = None
    for level, label in enumerate(_LOCALITY_LEVELS):
        groups: dict[str, list[GpuNode]] = {}
        for node in fitting:
            key = getattr(node, label) if label else "*"
            if key:  # a node without the label belongs to no group at this level
                groups.setdefault(key, []).append(node)
        for members in groups.values():
            if len(members) < shape.nodes_per_replica:
                continue
            chosen = tuple(
                sorted(
                    members,
                    key=lambda node: (
                        zone_count[node.zone],
                        free[node.name] - shape.gpus_per_node,
                        node.name,
                    ),
                )[: shape.nodes_per_replica]
            )
            score = (
                level,
                max(zone_count[node.zone] for node in chosen),
                sum(free[node.name] - shape.gpus_per_node for node in chosen),
                tuple(node.name for node in chosen),
            )
            if best is None or score < best[0]:
                best = (score, chosen)
        if best is not None:
            # A replica that fits at a closer level never goes to a looser one.
            return best[1]
    return None


def _why_unplaced(
    nodes: Sequence[GpuNode],
    shape: ReplicaShape,
    unplaced: int,
    free: dict[str, int],
    eligible: set[str],
) -> str:
    product = shape.gpu_product or "any product"
    if not eligible:
        products = sorted({node.gpu_product for node in nodes if node.schedulable})
        return (
            f"{unplaced} replica(s) not placed: no schedulable node has GPUs of {product} "
            f"(found: {', '.join(products) or 'no schedulable GPU nodes'}); add such nodes or "
            "change the GPU product"
        )
    roomy = sorted(name for name in eligible if free[name] >= shape.gpus_per_node)
    return (
        f"{unplaced} replica(s) not placed: each needs {shape.nodes_per_replica} node(s) with "
        f"{shape.gpus_per_node} free {product} GPU(s), and only {len(roomy)} such node(s) remain "
        f"({', '.join(roomy) or 'none'}); add GPU nodes, free GPUs, or lower replicas"
    )
