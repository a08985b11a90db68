"""The Kopf handlers of `Llama4Deployment` (importing this module registers them).

Thin by design: startup settings, one level-based reconcile for create/resume/update, a timer
that re-applies drift, timers for autoscaling (`handlers.autoscale`) and expert rebalancing
(`handlers.rebalance`), and a delete handler behind the project's finalizer. Each handler parses
Kopf's body once into a typed `Llama4Deployment` (`handlers.resource`) and hands that on. What the
handlers share (the reconciler, autoscaler, rebalancer and the lock that serialises planning) is
made once at startup and kept in Kopf's memo (`OperatorRuntime`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from llama4_operator import metrics
from llama4_operator.api.models import GROUP, PLURAL, VERSION
from llama4_operator.handlers.autoscale import Autoscaler
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.rebalance import Rebalancer
from llama4_operator.handlers.reconcile import Reconciler
from llama4_operator.handlers.resource import Llama4Deployment
from llama4_operator.handlers.status import RayWorkerPod, pod_ready
from llama4_operator.kube import Kube, kopf_connection
from llama4_operator.ray_dashboard import RayAuthenticationError, RayDashboard
from llama4_operator.renderers.children import (
    DEPLOYMENT_LABEL,
    RAY_GROUP_LABEL,
    RAY_NODE_TYPE_LABEL,
    external_app_name,
)

CONFIG = OperatorConfig.from_env()
FINALIZER = f"{GROUP}/finalizer"
HANDLER_TIMEOUT_S = 300
HANDLER_RETRIES = 20
HANDLER_BACKOFF_S = 10


@dataclass
class OperatorRuntime:
    """What every handler shares, one per operator process, kept in Kopf's memo."""

    reconciler: Reconciler
    autoscaler: Autoscaler
    rebalancer: Rebalancer
    # One reconciliation at a time, all objects included: each plans against the GPUs the
    # others placed (their status), so two plans made side by side would claim the same GPUs.
    # The rebalancer takes it too, to re-plan (see for_reconciler).
    planning_lock: asyncio.Lock

    @classmethod
    def for_reconciler(cls, reconciler: Reconciler, config: OperatorConfig) -> OperatorRuntime:
        lock = asyncio.Lock()
        return cls(
            reconciler=reconciler,
            autoscaler=Autoscaler.for_config(reconciler.kube, config),
            rebalancer=Rebalancer.for_config(reconciler, config, lock),
            planning_lock=lock,
        )


def runtime_of(memo: kopf.Memo) -> OperatorRuntime:
    """The runtime the startup handler put in `memo`; handlers that run before it retry."""
    runtime = memo.get("runtime")
    if not isinstance(runtime, OperatorRuntime):
        raise kopf.TemporaryError("the operator is still starting", delay=5)
    return runtime


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Kopf bookkeeping under the project's names, and the operator's limits."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # handler warnings become Kubernetes events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.queueing.worker_limit = 16
    settings.execution.max_workers = 8
    # A resync already running when a deletion arrives holds the finalizer until Kopf checks
    # again; its default of 60 s stalled deletes that a 1 s re-check finishes at once.
    settings.background.cancellation_polling = 1
    settings.peering.standalone = config.peering is None
    if config.peering is not None:
        settings.peering.name = config.peering
        settings.peering.mandatory = True


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """Log Kopf in with the same credentials the kube module uses (`--kubeconfig` honoured)."""
    return kopf_connection(CONFIG.kubeconfig, settings.networking.trust_env)


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    configure_settings(settings, CONFIG)
    dashboard = (
        RayDashboard(CONFIG.external_ray_dashboard, token_file=CONFIG.ray_auth_token_file)
        if CONFIG.external_ray_dashboard
        else None
    )
    reconciler = Reconciler(Kube.from_kubeconfig(CONFIG.kubeconfig), CONFIG, dashboard)
    memo["runtime"] = OperatorRuntime.for_reconciler(reconciler, CONFIG)
    logger.info(
        "llama4-operator started: metrics port %s, external Ray %s, resync every %.0fs",
        CONFIG.metrics_port or "off",
        CONFIG.external_ray_dashboard or "off",
        CONFIG.resync_interval_s,
    )


# Kopf passes each index to every handler as a keyword argument named after its function.
RayWorkers = kopf.Index[tuple[str, str], RayWorkerPod]


@kopf.index("v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT, RAY_NODE_TYPE_LABEL: "worker"})
def ray_worker_pods(
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    meta: kopf.Meta,
    status: kopf.Status,
    **_: Any,
) -> dict[tuple[str, str], RayWorkerPod]:
    """The Ray worker pods of each deployment, by (namespace, deployment): a lost worker shows
    here at once, while Serve's status (through KubeRay) lags by a minute or more."""
    return {
        (namespace or "", labels[DEPLOYMENT_LABEL]): RayWorkerPod(
            name=name,
            group=labels.get(RAY_GROUP_LABEL, ""),
            ready=pod_ready(status),
            ip=str(status.get("podIP") or ""),
            terminating=bool(meta.get("deletionTimestamp")),
        )
    }


async def _reconcile_locked(
    body: kopf.Body, memo: kopf.Memo, logger: Any, ray_workers: RayWorkers
) -> None:
    resource = Llama4Deployment.from_body(body)
    workers = tuple(ray_workers.get((resource.owner.namespace, resource.owner.name), ()))
    runtime = runtime_of(memo)
    async with runtime.planning_lock:
        await runtime.reconciler.reconcile(resource, logger, workers)


@kopf.on.resume(
    GROUP,
    VERSION,
    PLURAL,
    timeout=HANDLER_TIMEOUT_S,
    retries=HANDLER_RETRIES,
    backoff=HANDLER_BACKOFF_S,
)
@kopf.on.create(
    GROUP,
    VERSION,
    PLURAL,
    timeout=HANDLER_TIMEOUT_S,
    retries=HANDLER_RETRIES,
    backoff=HANDLER_BACKOFF_S,
)
@kopf.on.update(
    GROUP,
    VERSION,
    PLURAL,
    timeout=HANDLER_TIMEOUT_S,
    retries=HANDLER_RETRIES,
    backoff=HANDLER_BACKOFF_S,
)
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: Any, **kwargs: Any) -> None:
    """Create, resume and update: make the children match the spec."""
    await _reconcile_locked(body, memo, logger, kwargs["ray_worker_pods"])


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=CONFIG.resync_interval_s,
    initial_delay=CONFIG.resync_interval_s,
    timeout=HANDLER_TIMEOUT_S,
)
async def resync(body: kopf.Body, memo: kopf.Memo, logger: Any, **kwargs: Any) -> None:
    """Undo drift (children edited or deleted by hand) and refresh health in status."""
    try:
        await _reconcile_locked(body, memo, logger, kwargs["ray_worker_pods"])
    except kopf.PermanentError as error:
        logger.debug("resync skipped: %s", error)  # already reported in status


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=CONFIG.autoscale_interval_s,
    initial_delay=CONFIG.autoscale_interval_s,
    timeout=HANDLER_TIMEOUT_S,
)
async def autoscale(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Set spec.replicas from live token throughput when spec.autoscaling.enabled. Not under
    the planning lock: it waits on metrics over HTTP and only scales; reconcile does the rest."""
    await runtime_of(memo).autoscaler.tick(Llama4Deployment.from_body(body), logger)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=CONFIG.rebalance_tick_s,
    initial_delay=CONFIG.rebalance_tick_s,
    timeout=HANDLER_TIMEOUT_S,
)
async def rebalance(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Re-plan the experts from measured load when spec.placement.rebalance asks for it (each
    deployment once per its intervalSeconds); takes the planning lock only to re-plan."""
    try:
        await runtime_of(memo).rebalancer.check(Llama4Deployment.from_body(body), logger)
    except kopf.PermanentError as error:
        logger.debug("rebalance skipped: %s", error)  # reported in status by the reconcile


@kopf.on.delete(
    GROUP,
    VERSION,
    PLURAL,
    timeout=HANDLER_TIMEOUT_S,
    retries=HANDLER_RETRIES,
    backoff=HANDLER_BACKOFF_S,
)
async def delete(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Owner references remove the Kubernetes children; what they cannot reach goes here."""
    owner = Llama4Deployment.from_body(body).owner
    runtime = runtime_of(memo)
    reconciler = runtime.reconciler
    if reconciler.dashboard is not None:
        try:
            await reconciler.dashboard.remove(external_app_name(owner))
        except RayAuthenticationError as error:
            # A refused token will not mend itself soon: the deletion goes on, and says what
            # it left behind.
            reconciler.kube.post_event(
                owner,
                "Warning",
                "RayAuthenticationFailed",
                f"Serve application {external_app_name(owner)} may be left on the Ray cluster, "
                f"which refused to list or remove it: {error}",
            )
    metrics.forget(owner.namespace, owner.name)
    runtime.autoscaler.forget(owner.namespace, owner.name)
    runtime.rebalancer.forget(owner.namespace, owner.name)
    logger.info("cleaned up %s/%s", owner.namespace, owner.name)
