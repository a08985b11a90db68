"""From a spec and the cluster's GPU nodes to the whole desired state, in one pure function:
fit check -> cluster placement -> expert placement -> serving config -> child objects."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from llama4_operator.api.catalog import architecture_of
from llama4_operator.api.models import ExpertBalancer, Llama4DeploymentSpec, PlacementStatus
from llama4_operator.planners.cluster_placement import (
    ClusterPlacement,
    GpuNode,
    PodToleration,
    ReplicaAssignment,
    ReplicaShape,
    WorkerAssignment,
    place_replicas,
)
from llama4_operator.planners.fit import FitRequest, FitResult, capacities_from_nodes, check_fit
from llama4_operator.renderers.children import (
    Object,
    Owner,
    RayPodSettings,
    external_app_name,
    external_route_prefix,
    render_children,
    replica_of_worker_group,
)
from llama4_operator.renderers.serving import (
    ENGINE_METRICS_PORT,
    SERVE_HTTP_PORT,
    ExpertLayout,
    expert_balancer,
    plan_initial_experts,
    serve_application,
    serving_config,
)
from llama4_serving.config import ExpertPlacement, ServingConfig


@dataclass(frozen=True)
class Previous:
    """What the last reconciliation decided, to keep placements stable."""

    placement: ClusterPlacement | None = None
    experts: ExpertPlacement | None = None
    worker_groups: tuple[Mapping[str, Any], ...] = ()  # of the live RayService
    # Worker groups with a Ready pod that is not being deleted (the operator's pod index).
    running_worker_groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DesiredState:
    """Everything one reconciliation wants to exist."""

    fit: FitResult
    placement: ClusterPlacement | None = None
    experts: ExpertLayout | None = None
    serving: ServingConfig | None = None
    children: list[Object] = field(default_factory=list)
    external_application: dict[str, Any] | None = None
    skipped_nodes: tuple[str, ...] = ()
    expert_balancer: ExpertBalancer = "none"
    asleep: bool = False
    """Scaled to zero by the autoscaler: the application stays, and a request wakes it."""

    @property
    def placed_replicas(self) -> int:
        return len(self.placement.replicas) if self.placement else 0

    @property
    def gpus_held(self) -> int:
        """GPUs the placed replicas' workers request."""
        if self.placement is None:
            return 0
        return sum(w.gpus for replica in self.placement.replicas for w in replica.workers)


def pod_tolerations(spec: Llama4DeploymentSpec) -> list[PodToleration]:
    """The Ray pods' tolerations in the planner's terms."""
    return [
        PodToleration(
            key=t.key or "", operator=t.operator, value=t.value or "", effect=t.effect or ""
        )
        for t in spec.resources.tolerations
    ]


def previous_placement(status: PlacementStatus | None) -> ClusterPlacement | None:
    """The cluster placement recorded in status, in the planner's types."""
    if status is None or not status.replicas:
        return None
    return ClusterPlacement(
        replicas=tuple(
            ReplicaAssignment(
                index=replica.index,
                workers=tuple(WorkerAssignment(node=w.node, gpus=w.gpus) for w in replica.workers),
            )
            for replica in status.replicas
        ),
        unplaced=status.unplaced,
        reason=status.reason,
    )


def serve_replicas(placement: ClusterPlacement, running_worker_groups: Iterable[str]) -> int:
    """Serve's target: the placed replicas, and a retired one for as long as its worker pods
    run and are not being deleted. Serve chooses which replica to stop by its own ranking, so
    a target lowered before the retired worker drains may stop a replica the plan keeps, and
    the retired pod's replica must then be rebuilt on a kept worker before that pod can go.
    Once KubeRay deletes the pod, its preStop drain marks the Ray node draining, and Serve
    stops the replica there first."""
    placed = {replica.index for replica in placement.replicas}
    retired = {replica_of_worker_group(group) for group in running_worker_groups} - placed
    return len(placed) + len(retired - {None})


def desired_state(
    owner: Owner,
    spec: Llama4DeploymentSpec,
    nodes: Sequence[GpuNode],
    settings: RayPodSettings,
    previous: Previous,
    *,
    external_dashboard: str | None = None,
    external_serve_port: int = SERVE_HTTP_PORT,
    service_monitor_available: bool = False,
) -> DesiredState:
    """Plan and render. When the model does not fit, the state has no children."""
    # Only nodes the pods may land on count: fit and placement see what the scheduler will.
    tolerations = pod_tolerations(spec)
    selected = [
        node
        for node in nodes
        if node.matches(spec.resources.node_selector) and node.tolerated_by(tolerations)
    ]
    capacities, skipped = capacities_from_nodes(selected)
    fit = check_fit(FitRequest.from_spec(spec), capacities)
    if len(selected) < len(nodes) and not fit.fits:
        fit = replace(
            fit,
            message=f"{fit.message} (only the {len(selected)} of {len(nodes)} GPU nodes that "
            f"match resources.nodeSelector and whose NoSchedule/NoExecute taints "
            f"resources.tolerations tolerate count)",
        )
    nodes = selected
    if not fit.fits or fit.layout is None or fit.product is None:
        return DesiredState(fit=fit, skipped_nodes=tuple(skipped))
    layout = fit.layout
    # A product known only by its memory label has no product label to match nodes on.
    product_label: str | None = fit.product.label
    if not any(node.gpu_product == product_label for node in nodes):
        product_label = None
    shape = ReplicaShape(
        gpu_product=product_label,
        gpus_per_node=layout.gpus_per_node,
        nodes_per_replica=layout.nodes,
    )
    placement = place_replicas(nodes, shape, spec.replicas, previous.placement)
    experts = plan_initial_experts(
        architecture_of(spec.model), layout, spec.placement.redundant_expert_slots, previous.experts
    )
    config = serving_config(
        spec,
        owner.name,
        layout,
        serve_replicas(placement, previous.running_worker_groups),
        experts.placement,
        accelerator_resource=settings.accelerator_resource,
        namespace=owner.namespace,
        # External Ray: replicas may share a host and are found through the ingress' list.
        metrics_port=0 if external_dashboard else ENGINE_METRICS_PORT,
    )
    children = render_children(
        owner,
        spec,
        config,
        placement=placement,
        experts=experts.placement,
        gpu_product=product_label,
        settings=settings,
        external_dashboard=external_dashboard,
        external_serve_port=external_serve_port,
        service_monitor=spec.monitoring.service_monitor and service_monitor_available,
        live_worker_groups=previous.worker_groups,
    )
    asleep = spec.replicas == 0 and spec.autoscaling.scales_to_zero
    application = None
    if external_dashboard and (placement.replicas or asleep):
        application = serve_application(
            config, external_app_name(owner), external_route_prefix(owner)
        )
    return DesiredState(
        fit=fit,
        placement=placement,
        experts=experts,
        serving=config,
        children=children,
        external_application=application,
        skipped_nodes=tuple(skipped),
        expert_balancer=expert_balancer(spec, config.engine_args),
        asleep=asleep,
    )
