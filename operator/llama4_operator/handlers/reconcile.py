"""The one level-based reconciliation of a Llama4Deployment (create, resume, update and the timer
all call it): validate, plan and render, apply, prune, read health, write status, post events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from llama4_operator import metrics
from llama4_operator.api.models import (
    Llama4DeploymentSpec,
    Llama4DeploymentStatus,
)
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.status import (
    WORKER_LOST,
    ConditionUpdate,
    RayWorkerPod,
    ServeHealth,
    apply_failed_conditions,
    build_status,
    deployment_conditions,
    invalid_spec_conditions,
    merge_conditions,
    ray_service_health,
    replicas_without_workers,
    serve_details_health,
    transitions,
)
from llama4_operator.kube import SERVICE_MONITOR_CRD, KubeApi
from llama4_operator.ray_dashboard import RayAuthenticationError, RayDashboard
from llama4_operator.renderers.children import (
    EXPERT_PLACEMENT_KEY,
    Owner,
    RayPodSettings,
    endpoint_url,
    expert_config_map_name,
    external_app_name,
    pod_selector,
)
from llama4_operator.renderers.deployment import (
    DesiredState,
    Previous,
    desired_state,
    previous_placement,
)
from llama4_serving.config import ExpertPlacement

Body = Mapping[str, Any]


def format_validation_error(error: ValidationError) -> str:
    """`spec.a.b: message` for each problem pydantic found."""
    parts = []
    for problem in error.errors():
        path = ".".join(str(p) for p in problem["loc"])
        parts.append(f"spec.{path}: {problem['msg']}" if path else f"spec: {problem['msg']}")
    return "; ".join(parts)


def previous_status(body: Body) -> Llama4DeploymentStatus:
    """The status as the object holds it (empty when unreadable)."""
    try:
        return Llama4DeploymentStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return Llama4DeploymentStatus()  # a hand-edited status is not worth failing over


async def read_expert_placement(kube: KubeApi, owner: Owner) -> ExpertPlacement | None:
    """The expert plan in the deployment's placement ConfigMap (None: none yet, or unreadable)."""
    config_map = await kube.get("v1", "ConfigMap", owner.namespace, expert_config_map_name(owner))
    text = ((config_map or {}).get("data") or {}).get(EXPERT_PLACEMENT_KEY)
    try:
        return ExpertPlacement.model_validate(json.loads(text)) if text else None
    except (ValueError, ValidationError):
        return None  # edited by hand: plan afresh


def _measured_balance(body: Body, plan_version: int) -> float | None:
    """The rebalance loop's measured balance in status, when it is of this plan version."""
    placement = previous_status(body).placement
    if placement is None or placement.expert_plan_version != plan_version:
        return None
    return placement.measured_balance


def _forget_stale_measurement(body: Body, status: dict[str, Any]) -> None:
    """A plan replaced here (a new layout) was never measured: drop the old plan's figure."""
    new: dict[str, Any] = status.get("placement") or {}
    old = previous_status(body).placement
    if not new or old is None or old.measured_balance is None:
        return
    if new.get("expertPlanVersion") != old.expert_plan_version:
        new["measuredBalance"] = None


@dataclass
class Reconciler:
    """Holds the cluster access and settings; `reconcile` is called per object."""

    kube: KubeApi
    config: OperatorConfig
    dashboard: RayDashboard | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    async def reconcile(
        self,
        body: Body,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        ray_workers: Sequence[RayWorkerPod] | None = None,
    ) -> None:
        """`ray_workers`: the deployment's Ray worker pods (the operator's pod index); None:
        unknown, health comes from Serve's status alone."""
        with metrics.RECONCILE_DURATION.time():
            try:
                await self._reconcile(body, logger, ray_workers)
            except kopf.TemporaryError:
                metrics.RECONCILE_ERRORS.labels(kind="temporary").inc()
                raise
            except kopf.PermanentError:
                metrics.RECONCILE_ERRORS.labels(kind="permanent").inc()
                raise
            except Exception:
                metrics.RECONCILE_ERRORS.labels(kind="unexpected").inc()
                raise

    async def _reconcile(
        self,
        body: Body,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        ray_workers: Sequence[RayWorkerPod] | None,
    ) -> None:
        meta = body["metadata"]
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        generation = int(meta.get("generation", 0))
        try:
            spec = Llama4DeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            message = format_validation_error(error)
            await self._write(
                body,
                owner,
                generation=generation,
                updates=invalid_spec_conditions(message),
                state=None,
                health=None,
                spec=None,
            )
            raise kopf.PermanentError(f"invalid spec: {message}") from error
        state = await self._plan(body, owner, spec)
        if not state.fit.fits:
            metrics.FIT_FAILURES.inc()
            logger.info("does not fit: %s", state.fit.message)
        try:
            # Independent objects: applied together, as the reconcile holds the planning lock.
            await asyncio.gather(*(self.kube.apply(child) for child in state.children))
            if self.dashboard is not None:
                await self._sync_external(owner, state)
        except (kopf.PermanentError, RayAuthenticationError) as error:
            # A child the API server refuses will not be accepted on retry either, nor a token
            # the Ray cluster refuses (retried slowly, in case a Secret changes): say so.
            reason = (
                "RayAuthenticationFailed"
                if isinstance(error, RayAuthenticationError)
                else "ApplyFailed"
            )
            await self._write(
                body,
                owner,
                generation=generation,
                updates=apply_failed_conditions(state, str(error), reason),
                state=state,
                health=None,
                spec=spec,
            )
            raise
        keep = {(c["kind"], c["metadata"]["name"]) for c in state.children}
        removed, health = await asyncio.gather(
            self.kube.prune_children(owner.namespace, owner.name, owner.uid, keep),
            self._health(body, owner, state, ray_workers),
        )
        if removed:
            self.kube.post_event(
                body, "Normal", "ChildrenRemoved", "removed " + ", ".join(sorted(removed))
            )
        conditions = deployment_conditions(state, health)
        await self._write(
            body,
            owner,
            generation=generation,
            updates=conditions,
            state=state,
            health=health,
            spec=spec,
        )
        if state.experts is not None:
            measured = _measured_balance(body, state.experts.placement.version)
            balance = state.experts.balance if measured is None else measured
            metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(balance)
            # Exported at 0 before the first rebalance, so the dashboards' increase() has data.
            metrics.EXPERT_REBALANCES.labels(owner.namespace, owner.name)

    async def _plan(self, body: Body, owner: Owner, spec: Llama4DeploymentSpec) -> DesiredState:
        nodes = await self.kube.gpu_nodes(owner.namespace, owner.name)
        service_monitor = spec.monitoring.service_monitor and await self.kube.crd_exists(
            SERVICE_MONITOR_CRD
        )
        live = await self.kube.get("ray.io/v1", "RayService", owner.namespace, owner.name)
        groups = (((live or {}).get("spec") or {}).get("rayClusterConfig") or {}).get(
            "workerGroupSpecs"
        ) or []
        previous = Previous(
            placement=previous_placement(previous_status(body).placement),
            experts=await self._previous_experts(owner),
            worker_groups=tuple(groups),
        )
        settings = RayPodSettings(
            image=self.config.image,
            ray_version=self.config.ray_version,
            accelerator_resource=self.config.accelerator_resource,
            network_policy=self.config.ray_network_policy,
            head_cpu=self.config.ray_head_cpu,
            head_memory=self.config.ray_head_memory,
            worker_cpu_per_gpu=self.config.ray_worker_cpu_per_gpu,
            worker_memory_per_gpu=self.config.ray_worker_memory_per_gpu,
            cpu_limit=self.config.ray_cpu_limit,
        )
        return desired_state(
            owner,
            spec,
            nodes,
            settings,
            previous,
            external_dashboard=self.config.external_ray_dashboard,
            service_monitor_available=service_monitor,
        )

    async def _previous_experts(self, owner: Owner) -> ExpertPlacement | None:
        return await read_expert_placement(self.kube, owner)

    async def _sync_external(self, owner: Owner, state: DesiredState) -> None:
        assert self.dashboard is not None
        if state.external_application is not None and state.placed_replicas:
            await self.dashboard.deploy(state.external_application)
        else:
            await self.dashboard.remove(external_app_name(owner))

    async def _health(
        self,
        body: Body,
        owner: Owner,
        state: DesiredState,
        ray_workers: Sequence[RayWorkerPod] | None,
    ) -> ServeHealth | None:
        if not state.fit.fits or not state.placed_replicas:
            return None
        if self.dashboard is not None:
            return serve_details_health(await self.dashboard.application(external_app_name(owner)))
        ray_service = await self.kube.get("ray.io/v1", "RayService", owner.namespace, owner.name)
        health = ray_service_health(ray_service, owner.name)
        if ray_workers is None:
            return health
        not_ready = replicas_without_workers(state, ray_workers)
        # Lost, not starting: fewer replicas have their workers than served at the last look,
        # or they were already reported lost and are not back yet.
        before = previous_status(body)
        degraded = next((c for c in before.conditions if c.type == "Degraded"), None)
        lost = bool(not_ready) and (
            state.placed_replicas - len(not_ready) < before.ready_replicas
            or (degraded is not None and degraded.reason == WORKER_LOST)
        )
        return replace(health, workers_not_ready=not_ready, workers_lost=lost)

    async def _write(
        self,
        body: Body,
        owner: Owner,
        *,
        generation: int,
        updates: list[ConditionUpdate],
        state: DesiredState | None,
        health: ServeHealth | None,
        spec: Llama4DeploymentSpec | None,
    ) -> None:
        previous = (body.get("status") or {}).get("conditions") or []
        conditions = merge_conditions(previous, updates, generation, self.clock())
        status = build_status(
            generation=generation,
            conditions=conditions,
            state=state,
            health=health,
            selector=pod_selector(owner),
            endpoint=(
                endpoint_url(owner, spec, self.config.external_ray_dashboard) if spec else ""
            ),
            previously_ready=previous_status(body).ready_replicas,
        )
        _forget_stale_measurement(body, status)
        await self.kube.patch_status(owner.namespace, owner.name, status)
        metrics.record_conditions(
            owner.namespace, owner.name, {c.type: c.status for c in conditions}
        )
        metrics.record_capacity(
            owner.namespace,
            owner.name,
            ready_replicas=status.get("readyReplicas", 0),
            gpus=state.gpus_held if state else 0,
        )
        posted: set[tuple[str, str]] = set()
        # Warnings first, so a message shared with a Normal condition is posted as a Warning.
        for update in sorted(transitions(previous, updates), key=lambda u: not u.is_bad):
            if (update.reason, update.message) in posted:
                continue  # e.g. Fits and Degraded both carrying the fit check's message
            posted.add((update.reason, update.message))
            kind = "Warning" if update.is_bad else "Normal"
            self.kube.post_event(body, kind, update.reason, f"{update.type}: {update.message}")
