"""The one level-based reconciliation of a Llama4Deployment (create, resume, update and the timer
all call it): validate, plan and render, apply, prune, read health, write status, post events."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from llama4_operator import metrics
from llama4_operator.api.models import Llama4DeploymentSpec, Llama4DeploymentStatus
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.resource import Llama4Deployment
from llama4_operator.handlers.status import (
    DEPLOYING,
    RUNNING,
    WORKER_LOST,
    ConditionUpdate,
    RayWorkerPod,
    ServeHealth,
    apply_failed_conditions,
    build_status,
    deployment_conditions,
    event_message,
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
    active_ray_cluster,
    endpoint_url,
    expert_config_map_name,
    external_app_name,
    pod_selector,
    ray_service_dashboard_url,
    ray_service_token_secret,
)
from llama4_operator.renderers.deployment import (
    DesiredState,
    Previous,
    desired_state,
    previous_placement,
)
from llama4_serving.config import ExpertPlacement

log = logging.getLogger(__name__)
# Serve's replica states are read from the RayService's head on every reconcile, under the
# planning lock: a head that does not answer must not hold the others up for long.
SERVE_DETAILS_TIMEOUT_S = 5.0
RAY_TOKEN_KEY = "auth_token"  # KubeRay's key in a Ray cluster's token Secret
# What RayDashboard.application says when it could not read the application.
UNREAD_APPLICATION = frozenset({"UNREACHABLE", "UNAUTHENTICATED", "NOT_FOUND"})


def running_worker_groups(
    ray_service: Mapping[str, Any] | None, ray_workers: Sequence[RayWorkerPod]
) -> frozenset[str]:
    """The worker groups whose pods serve and are not being deleted, which hold Serve's target
    up during a scale-down (see `serve_replicas`). Empty while KubeRay moves to a new cluster:
    that cluster lacks the retired groups, and a target held for them would stall the move."""
    status = (ray_service or {}).get("status") or {}
    if (status.get("pendingServiceStatus") or {}).get("rayClusterName"):
        return frozenset()
    return frozenset(pod.group for pod in ray_workers if pod.ready and not pod.terminating)


async def read_expert_placement(kube: KubeApi, owner: Owner) -> ExpertPlacement | None:
    """The expert plan in the deployment's placement ConfigMap (None: none yet, or unreadable)."""
    config_map = await kube.get("v1", "ConfigMap", owner.namespace, expert_config_map_name(owner))
    text = ((config_map or {}).get("data") or {}).get(EXPERT_PLACEMENT_KEY)
    try:
        return ExpertPlacement.model_validate(json.loads(text)) if text else None
    except (ValueError, ValidationError):
        return None  # edited by hand: plan afresh


def _measured_balance(status: Llama4DeploymentStatus, plan_version: int) -> float | None:
    """The rebalance loop's measured balance in status, when it is of this plan version."""
    placement = status.placement
    if placement is None or placement.measured_plan_version != plan_version:
        return None
    return placement.measured_balance


@dataclass
class Reconciler:
    """Holds the cluster access and settings; `reconcile` is called per object, with the object
    as the event delivered it."""

    kube: KubeApi
    config: OperatorConfig
    dashboard: RayDashboard | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # How the RayServices' heads are reached (tests give a fake one); None: over the network.
    head_transport: httpx.AsyncBaseTransport | None = None

    async def reconcile(
        self,
        resource: Llama4Deployment,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        ray_workers: Sequence[RayWorkerPod] | None = None,
    ) -> None:
        """`ray_workers`: the deployment's Ray worker pods (the operator's pod index); None:
        unknown, health comes from Serve's status alone."""
        with metrics.RECONCILE_DURATION.time():
            try:
                await self._reconcile(resource, logger, ray_workers)
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
        resource: Llama4Deployment,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        ray_workers: Sequence[RayWorkerPod] | None,
    ) -> None:
        owner, spec = resource.owner, resource.spec
        if spec is None:
            await self._write(
                resource,
                updates=invalid_spec_conditions(resource.spec_error),
                state=None,
                health=None,
            )
            raise kopf.PermanentError(f"invalid spec: {resource.spec_error}")
        state = await self._plan(resource, spec, ray_workers or ())
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
                resource,
                updates=apply_failed_conditions(state, str(error), reason),
                state=state,
                health=None,
            )
            raise
        keep = {(c["kind"], c["metadata"]["name"]) for c in state.children}
        removed, health = await asyncio.gather(
            self.kube.prune_children(owner.namespace, owner.name, owner.uid, keep),
            self._health(resource, state, ray_workers),
        )
        if removed:
            self.kube.post_event(
                owner, "Normal", "ChildrenRemoved", "removed " + ", ".join(sorted(removed))
            )
        conditions = deployment_conditions(state, health)
        await self._write(resource, updates=conditions, state=state, health=health)
        if state.experts is not None:
            measured = _measured_balance(resource.status, state.experts.placement.version)
            balance = state.experts.balance if measured is None else measured
            metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(balance)
            # Exported at 0 before the first rebalance, so the dashboards' increase() has data.
            metrics.EXPERT_REBALANCES.labels(owner.namespace, owner.name)

    async def _plan(
        self,
        resource: Llama4Deployment,
        spec: Llama4DeploymentSpec,
        ray_workers: Sequence[RayWorkerPod],
    ) -> DesiredState:
        owner = resource.owner
        nodes = await self.kube.gpu_nodes(owner.namespace, owner.name)
        service_monitor = spec.monitoring.service_monitor and await self.kube.crd_exists(
            SERVICE_MONITOR_CRD
        )
        live = await self.kube.get("ray.io/v1", "RayService", owner.namespace, owner.name)
        groups = (((live or {}).get("spec") or {}).get("rayClusterConfig") or {}).get(
            "workerGroupSpecs"
        ) or []
        previous = Previous(
            placement=previous_placement(resource.status.placement),
            experts=await self._previous_experts(owner),
            worker_groups=tuple(groups),
            running_worker_groups=running_worker_groups(live, ray_workers),
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
            worker_drain_seconds=self.config.ray_worker_drain_s,
        )
        return desired_state(
            owner,
            spec,
            nodes,
            settings,
            previous,
            external_dashboard=self.config.external_ray_dashboard,
            external_serve_port=self.config.external_ray_serve_port,
            service_monitor_available=service_monitor,
        )

    async def _previous_experts(self, owner: Owner) -> ExpertPlacement | None:
        return await read_expert_placement(self.kube, owner)

    async def _sync_external(self, owner: Owner, state: DesiredState) -> None:
        assert self.dashboard is not None
        if state.external_application is not None:
            await self.dashboard.deploy(state.external_application)
        else:
            await self.dashboard.remove(external_app_name(owner))

    async def _health(
        self,
        resource: Llama4Deployment,
        state: DesiredState,
        ray_workers: Sequence[RayWorkerPod] | None,
    ) -> ServeHealth | None:
        owner = resource.owner
        if not state.fit.fits or not state.placed_replicas:
            return None
        if self.dashboard is not None:
            return serve_details_health(await self.dashboard.application(external_app_name(owner)))
        ray_service = await self.kube.get("ray.io/v1", "RayService", owner.namespace, owner.name)
        health = ray_service_health(ray_service, owner.name)
        if ray_workers is None:
            return health
        if ray_service is not None and health.status in (RUNNING, DEPLOYING):
            live_hosts = {pod.ip for pod in ray_workers if pod.ready and pod.ip}
            replicas = await self._serve_replicas(owner, ray_service, live_hosts)
            if replicas is not None:
                health = replace(health, running_replicas=replicas)
        not_ready = replicas_without_workers(state, ray_workers)
        # Lost, not starting: fewer replicas have their workers than served at the last look,
        # or they were already reported lost and their engines are not all back yet.
        before = resource.status
        degraded = next((c for c in before.conditions if c.type == "Degraded"), None)
        engines = health.engine_replicas
        lost = bool(not_ready) and state.placed_replicas - len(not_ready) < before.ready_replicas
        lost = lost or (
            degraded is not None
            and degraded.reason == WORKER_LOST
            and (bool(not_ready) or (engines is not None and engines < state.placed_replicas))
        )
        return replace(health, workers_not_ready=not_ready, workers_lost=lost)

    async def _serve_replicas(
        self, owner: Owner, ray_service: Mapping[str, Any], live_hosts: Collection[str]
    ) -> Mapping[str, int] | None:
        """RUNNING replicas per Serve deployment, engines counted only on live worker pods, as
        the RayService's head lists them; None where the head cannot be read (KubeRay's view
        stands then). KubeRay reports an application HEALTHY while an engine is restarting."""
        ray_cluster = active_ray_cluster(ray_service)
        if ray_cluster is None:
            return None
        dashboard = RayDashboard(
            ray_service_dashboard_url(owner, ray_cluster),
            transport=self.head_transport,
            timeout_s=SERVE_DETAILS_TIMEOUT_S,
        )
        try:
            secret_name = ray_service_token_secret(ray_service)
            if secret_name is not None:
                dashboard.token = await self._ray_token(owner.namespace, secret_name)
            app = await dashboard.application(owner.name)
        except Exception as error:  # the head is optional here: never fatal
            log.debug("Serve replicas of %s/%s unread: %s", owner.namespace, owner.name, error)
            return None
        if app.get("status") in UNREAD_APPLICATION:
            log.debug(
                "Serve replicas of %s/%s unread: %s", owner.namespace, owner.name, app["message"]
            )
            return None
        return serve_details_health(app, engine_hosts=live_hosts).running_replicas

    async def _ray_token(self, namespace: str, secret_name: str) -> str:
        secret = await self.kube.get("v1", "Secret", namespace, secret_name)
        encoded = ((secret or {}).get("data") or {}).get(RAY_TOKEN_KEY)
        if not encoded:
            raise LookupError(f"no {RAY_TOKEN_KEY} in Secret {namespace}/{secret_name}")
        return base64.b64decode(encoded).decode().strip()

    async def _write(
        self,
        resource: Llama4Deployment,
        *,
        updates: list[ConditionUpdate],
        state: DesiredState | None,
        health: ServeHealth | None,
    ) -> None:
        """The reconciler's part of the status (the autoscaler and the rebalance loop write
        theirs), its metrics, and an event for each condition that changed."""
        owner, spec, previous = resource.owner, resource.spec, resource.status
        conditions = merge_conditions(
            previous.conditions, updates, resource.generation, self.clock()
        )
        status = build_status(
            generation=resource.generation,
            conditions=conditions,
            state=state,
            health=health,
            selector=pod_selector(owner),
            endpoint=(
                endpoint_url(
                    owner,
                    spec,
                    self.config.external_ray_dashboard,
                    self.config.external_ray_serve_port,
                )
                if spec
                else ""
            ),
            previously_ready=previous.ready_replicas,
        )
        await self.kube.patch_status(owner.namespace, owner.name, status.model_dump(mode="json"))
        metrics.record_conditions(
            owner.namespace, owner.name, {c.type: c.status for c in conditions}
        )
        metrics.record_capacity(
            owner.namespace,
            owner.name,
            ready_replicas=status.ready_replicas,
            gpus=state.gpus_held if state else 0,
        )
        posted: set[tuple[str, str]] = set()
        # Warnings first, so a message shared with a Normal condition is posted as a Warning.
        for update in sorted(transitions(previous.conditions, updates), key=lambda u: not u.is_bad):
            if (update.reason, update.message) in posted:
                continue  # e.g. Fits and Degraded both carrying the fit check's message
            posted.add((update.reason, update.message))
            kind = "Warning" if update.is_bad else "Normal"
            self.kube.post_event(owner, kind, update.reason, event_message(update))
