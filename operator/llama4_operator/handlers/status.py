"""Status of a Llama4Deployment from what a reconciliation found (pure functions).

Conditions follow metav1.Condition: `lastTransitionTime` changes only when the status does, and
each carries the generation it was computed for. Health is read from the RayService (or the
external Ray dashboard) and never assumed. Ready means "serving requests": a RUNNING Serve
application, or one DEPLOYING only because replicas are being added or removed (Serve reports
every change of `num_replicas` as DEPLOYING) while those already up keep answering, like a
Deployment that stays Available during a scale-up.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llama4_operator.api.models import (
    Condition,
    FitStatus,
    ReconciledStatus,
    RenderedPlacement,
    ReplicaSummary,
    WorkerSummary,
)
from llama4_operator.planners.gpu_products import GIB
from llama4_operator.renderers.children import worker_group_name
from llama4_operator.renderers.deployment import DesiredState
from llama4_serving.config import is_engine_deployment

RUNNING = "RUNNING"
WORKER_LOST = "RayWorkerLost"
DEPLOYING = "DEPLOYING"
DEPLOY_FAILED = "DEPLOY_FAILED"  # the application could not be built or its replicas started
REPLICA_RUNNING = "RUNNING"
# Serve's state of a replica on a draining Ray node: it serves until its replacement runs.
REPLICA_MIGRATING = "PENDING_MIGRATION"
SERVING_REPLICA_STATES = frozenset({REPLICA_RUNNING, REPLICA_MIGRATING})
# Serve deployment states in which the replicas already started go on serving.
SERVING_DEPLOYMENT_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})


@dataclass(frozen=True)
class ConditionUpdate:
    """A condition as this reconciliation sees it."""

    type: str
    status: str
    reason: str
    message: str = ""

    @property
    def is_bad(self) -> bool:
        """Whether a user should be warned about it."""
        if self.type == "Degraded":
            return self.status == "True"
        return self.type in ("Ready", "Fits") and self.status == "False"


@dataclass(frozen=True)
class RayWorkerPod:
    """A Ray worker pod of a deployment, as the operator's pod index keeps it."""

    name: str
    group: str  # its KubeRay worker group, `r<replica>-w<worker>`
    ready: bool
    ip: str = ""  # the pod's IP: the Ray node IP of what runs on it
    terminating: bool = False  # deleted and draining its Ray node (metadata.deletionTimestamp)


def pod_ready(status: Mapping[str, Any]) -> bool:
    """Whether a pod's Ready condition is True (the kubelet runs KubeRay's Ray probes)."""
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def replicas_without_workers(
    state: DesiredState, workers: Sequence[RayWorkerPod]
) -> dict[int, str]:
    """Placed replicas with a worker group that has no Ready pod (starting, or lost and being
    replaced by KubeRay), each with why; Serve's status lags a loss by a minute or more."""
    if state.placement is None:
        return {}
    ready_groups = {pod.group for pod in workers if pod.ready}
    pods_of: dict[str, list[str]] = {}
    for pod in workers:
        pods_of.setdefault(pod.group, []).append(pod.name)
    missing = {}
    for replica in state.placement.replicas:
        groups = [worker_group_name(replica.index, i) for i in range(len(replica.workers))]
        lost = [group for group in groups if group not in ready_groups]
        if lost:
            missing[replica.index] = ", ".join(
                f"worker group {group} has no Ready pod"
                + (f" ({', '.join(sorted(pods_of[group]))} not Ready)" if group in pods_of else "")
                for group in lost
            )
    return missing


@dataclass(frozen=True)
class ServeHealth:
    """The Serve application's state as its host reports it."""

    status: str  # RUNNING, DEPLOYING, UNHEALTHY, ... or NOT_FOUND / UNREACHABLE
    message: str = ""
    # Serve deployment -> its status (HEALTHY, UPDATING, UPSCALING, ...), where reported.
    deployments: Mapping[str, str] = field(default_factory=dict)
    # Serve deployment -> replicas in state RUNNING; None where the host does not say (KubeRay).
    running_replicas: Mapping[str, int] | None = None
    # Placed replicas whose Ray worker pods are not all Ready, with why (RayService mode).
    workers_not_ready: Mapping[int, str] = field(default_factory=dict)
    # Whether some of them served before: pods lost, not pods of a replica still starting.
    workers_lost: bool = False

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    @property
    def engine_replicas(self) -> int | None:
        """Engine replicas RUNNING, where the host gives counts."""
        if self.running_replicas is None:
            return None
        return sum(n for name, n in self.running_replicas.items() if is_engine_deployment(name))

    @property
    def serving(self) -> bool:
        """Whether requests are answered now, even while replicas are added or removed."""
        if self.running:
            return True
        if self.running_replicas is not None:
            return (
                self.status == DEPLOYING
                and bool(self.running_replicas)
                and all(count > 0 for count in self.running_replicas.values())
            )
        return (
            self.status == DEPLOYING
            and bool(self.deployments)
            and all(state in SERVING_DEPLOYMENT_STATES for state in self.deployments.values())
        )

    def ready_replicas(self, placed: int, previously_ready: int) -> int:
        """Engine replicas serving, at most the placed ones less those whose worker pods are
        lost. Without counts from the host: all placed ones when RUNNING, else those ready
        before (a scale does not stop them)."""
        if not self.serving:
            return 0
        with_workers = placed - len(self.workers_not_ready)
        if self.engine_replicas is not None:
            return max(min(self.engine_replicas, with_workers), 0)
        if self.running:
            return max(with_workers, 0)
        return max(min(max(previously_ready, 1), with_workers), 0)

    @property
    def detail(self) -> str:
        """e.g. "Serve application status DEPLOYING (LLMServer UPSCALING): message"."""
        text = f"Serve application status {self.status}"
        changing = {n: s for n, s in self.deployments.items() if s != "HEALTHY"}
        if changing:
            text += " (" + ", ".join(f"{n} {s}" for n, s in sorted(changing.items())) + ")"
        message = _without_traceback(self.message)
        return f"{text}: {message}" if message else text


TRACEBACK = "Traceback (most recent call last):"


def _without_traceback(message: str) -> str:
    """Serve's message with a Python traceback cut down to the exception it ends with (what a
    user can act on; the whole traceback stays in Ray's Serve logs)."""
    head, found, trace = message.partition(TRACEBACK)
    if not found:
        return message
    # The exception is the last line that does not belong to a frame (frames are indented).
    exception = next(
        (line for line in reversed(trace.splitlines()) if line and not line[0].isspace()),
        trace.strip(),
    )
    return f"{head.strip()} {exception} (traceback in Ray's Serve logs)".strip()


def ray_service_health(ray_service: Mapping[str, Any] | None, app_name: str) -> ServeHealth:
    """Read a KubeRay RayService's status for one Serve application."""
    if ray_service is None:
        return ServeHealth("NOT_FOUND", "the RayService does not exist yet")
    status = ray_service.get("status") or {}
    active = status.get("activeServiceStatus") or {}
    apps = active.get("applicationStatuses") or {}
    app = apps.get(app_name)
    if not isinstance(app, Mapping):
        pending = status.get("pendingServiceStatus") or {}
        if (pending.get("applicationStatuses") or {}).get(app_name):
            return ServeHealth("DEPLOYING", "the RayService is preparing a new Ray cluster")
        return ServeHealth(
            "NOT_STARTED", "KubeRay reports no Serve application yet (Ray cluster starting)"
        )
    deployments = app.get("serveDeploymentStatuses") or {}
    app_status, message = str(app.get("status", "UNKNOWN")), str(app.get("message", "") or "")
    generation = (ray_service.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if app_status == RUNNING and generation and observed is not None and observed < generation:
        # KubeRay has not read the last change yet: RUNNING is the old config's (a scale-up
        # would otherwise count its new replicas ready before they start).
        app_status = DEPLOYING
        message = f"KubeRay has not applied generation {generation} yet (observed {observed})"
    return ServeHealth(
        app_status,
        message,
        deployments={
            str(name): str(d.get("status", "UNKNOWN"))
            for name, d in deployments.items()
            if isinstance(d, Mapping)
        },
    )


def serve_details_health(
    app: Mapping[str, Any], engine_hosts: Collection[str] | None = None
) -> ServeHealth:
    """Read one application of Ray Serve's REST details (`GET /api/serve/applications/`), which
    lists each deployment's replicas and their states. `engine_hosts`: the IPs of the Ready Ray
    worker pods, where known; an engine replica elsewhere is not counted, as Serve goes on
    listing a replica RUNNING for a while after its pod is gone. A replica on a draining worker
    (PENDING_MIGRATION) counts: Serve routes to it until its replacement runs."""
    deployments = {
        str(name): d for name, d in (app.get("deployments") or {}).items() if isinstance(d, Mapping)
    }

    def alive(name: str, replica: Mapping[str, Any]) -> bool:
        if replica.get("state") not in SERVING_REPLICA_STATES:
            return False
        return (
            engine_hosts is None
            or not is_engine_deployment(name)
            or replica.get("node_ip") in engine_hosts
        )

    return ServeHealth(
        str(app.get("status", "UNKNOWN")),
        str(app.get("message", "") or ""),
        deployments={name: str(d.get("status", "UNKNOWN")) for name, d in deployments.items()},
        # No counts while the details list no deployment (an application still building).
        running_replicas={
            name: sum(
                1
                for replica in d.get("replicas") or []
                if isinstance(replica, Mapping) and alive(name, replica)
            )
            for name, d in deployments.items()
        }
        or None,
    )


def merge_conditions(
    previous: Sequence[Condition],
    updates: Sequence[ConditionUpdate],
    generation: int,
    now: datetime,
) -> list[Condition]:
    """New conditions; each keeps its previous transition time while its status is unchanged."""
    before = {c.type: c for c in previous}
    merged: list[Condition] = []
    for update in updates:
        old = before.get(update.type)
        unchanged = old is not None and old.status == update.status
        merged.append(
            Condition.model_validate(
                {
                    "type": update.type,
                    "status": update.status,
                    "reason": update.reason,
                    "message": update.message,
                    "lastTransitionTime": old.last_transition_time if old and unchanged else now,
                    "observedGeneration": generation,
                }
            )
        )
    return merged


def transitions(
    previous: Sequence[Condition], updates: Sequence[ConditionUpdate]
) -> list[ConditionUpdate]:
    """The updates whose status or reason differ from before: each deserves an event."""
    before = {c.type: (c.status, c.reason) for c in previous}
    return [u for u in updates if before.get(u.type) != (u.status, u.reason)]


def event_message(update: ConditionUpdate) -> str:
    """The event of a transition: `Type: message`, or `not Degraded: message` when Degraded
    turns False, so that a recovery never reads as a degradation."""
    if update.type == "Degraded" and update.status == "False":
        return f"not Degraded: {update.message}"
    return f"{update.type}: {update.message}"


def invalid_spec_conditions(message: str) -> list[ConditionUpdate]:
    return [
        ConditionUpdate("Ready", "False", "InvalidSpec", message),
        ConditionUpdate("Progressing", "False", "InvalidSpec", message),
        ConditionUpdate("Degraded", "True", "InvalidSpec", message),
        ConditionUpdate("Fits", "Unknown", "InvalidSpec", message),
    ]


def apply_failed_conditions(
    state: DesiredState, message: str, reason: str = "ApplyFailed"
) -> list[ConditionUpdate]:
    """A child the API server refused, or an external Ray cluster that refused the operator's
    token (`RayAuthenticationFailed`): nothing new runs until someone changes something."""
    fits = deployment_conditions(state, None)[-1]
    return [
        ConditionUpdate("Ready", "False", reason, message),
        ConditionUpdate("Progressing", "False", reason, message),
        ConditionUpdate("Degraded", "True", reason, message),
        fits,
    ]


def engines_waiting(health: ServeHealth, placed: int) -> str:
    """Why some placed replicas do not serve although Serve's application status says it does
    (empty when all do): their worker pods are not Ready (Serve learns of a lost pod a minute or
    more later), or their engines are not RUNNING on live pods (an engine restarting on a
    replacement pod takes a minute or more to build)."""
    if health.workers_not_ready:
        return "; ".join(
            f"replica {i}: {why}" for i, why in sorted(health.workers_not_ready.items())
        )
    engines = health.engine_replicas
    if engines is not None and engines < placed:
        return f"{engines} of {placed} engine replicas running; Serve is starting the others"
    return ""


def deployment_conditions(state: DesiredState, health: ServeHealth | None) -> list[ConditionUpdate]:
    """Ready, Progressing, Degraded and Fits for a reconciled state."""
    fit = state.fit
    if not fit.fits:
        return [
            ConditionUpdate("Ready", "False", "DoesNotFit", "no replica can be placed"),
            ConditionUpdate("Progressing", "False", "DoesNotFit", fit.message),
            ConditionUpdate("Degraded", "True", "DoesNotFit", fit.message),
            ConditionUpdate("Fits", "False", "DoesNotFit", fit.message),
        ]
    fits = ConditionUpdate("Fits", "True", "Fits", fit.message)
    unplaced = state.placement.unplaced if state.placement else 0
    degraded = (
        ConditionUpdate(
            "Degraded",
            "True",
            "InsufficientFreeGPUs",
            state.placement.reason if state.placement else "",
        )
        if unplaced
        else ConditionUpdate("Degraded", "False", "AsExpected", "every replica is placed")
    )
    if state.asleep:
        # Ready as a scaled-to-zero Knative Service is: the endpoint answers, after a cold start
        # (and no NotReady alert fires for a deployment that is idle by design).
        message = "scaled to zero: the next request starts a replica and waits for it"
        ready = ConditionUpdate("Ready", "True", "ScaledToZero", message)
        progressing = ConditionUpdate("Progressing", "False", "ScaledToZero", message)
    elif state.placed_replicas == 0:
        ready = ConditionUpdate("Ready", "False", "NoReplicas", "no replica is placed")
        progressing = ConditionUpdate(
            "Progressing", "False", "NoReplicas", "spec.replicas is 0 or no replica fits now"
        )
    elif health is not None and health.running:
        ready = ConditionUpdate("Ready", "True", "ServeApplicationRunning", "serving requests")
        progressing = ConditionUpdate("Progressing", "False", "Deployed", "the plan is deployed")
    elif health is not None and health.serving:
        ready = ConditionUpdate(
            "Ready", "True", "ServingWhileDeploying", f"serving requests; {health.detail}"
        )
        progressing = ConditionUpdate("Progressing", "True", "Deploying", health.detail)
    elif health is not None and health.status == DEPLOY_FAILED:
        # Serve gave up (a build error, an engine that refused its arguments): say why, once, as
        # a transition of its own, and stop claiming progress.
        reason = "ServeApplicationFailed"
        ready = ConditionUpdate("Ready", "False", reason, health.detail)
        progressing = ConditionUpdate("Progressing", "False", reason, health.detail)
        degraded = ConditionUpdate("Degraded", "True", reason, health.detail)
    else:
        detail = health.detail if health else "Serve application status UNKNOWN"
        ready = ConditionUpdate("Ready", "False", "ServeApplicationNotHealthy", detail)
        progressing = ConditionUpdate("Progressing", "True", "Deploying", detail)
    # A lost worker is said whatever Serve reports meanwhile: once Serve notices the loss it may
    # report the application DEPLOYING, which without the lost replica is not serving either.
    lost = health is not None and health.workers_lost and health.status != DEPLOY_FAILED
    if health is not None and (health.serving or lost):
        ready, progressing, degraded = _while_engines_wait(
            state, health, ready, progressing, degraded
        )
    return [ready, progressing, degraded, fits]


def _while_engines_wait(
    state: DesiredState,
    health: ServeHealth,
    ready: ConditionUpdate,
    progressing: ConditionUpdate,
    degraded: ConditionUpdate,
) -> tuple[ConditionUpdate, ConditionUpdate, ConditionUpdate]:
    """Ready, Progressing and Degraded where Serve says the application serves but some placed
    replicas do not (see `engines_waiting`)."""
    waiting = engines_waiting(health, state.placed_replicas)
    if not waiting:
        return ready, progressing, degraded
    if health.workers_lost:
        reason = WORKER_LOST
        message = (
            f"{waiting}; KubeRay is replacing the pods" if health.workers_not_ready else waiting
        )
        degraded = ConditionUpdate("Degraded", "True", reason, message)
    elif health.workers_not_ready:
        reason, message = "RayWorkerStarting", waiting
    else:
        reason, message = "EngineStarting", waiting
    if progressing.status != "True" or health.workers_lost:
        progressing = ConditionUpdate("Progressing", "True", reason, message)
    if len(health.workers_not_ready) >= state.placed_replicas or health.engine_replicas == 0:
        ready = ConditionUpdate("Ready", "False", reason, message)
    return ready, progressing, degraded


def fit_status(state: DesiredState) -> FitStatus:
    fit = state.fit
    layout, memory = fit.layout, fit.memory
    return FitStatus(
        fits=fit.fits,
        gpu_product=fit.product.label if fit.product else None,
        gpus_per_replica=layout.gpus if layout else 0,
        nodes_per_replica=layout.nodes if layout else 0,
        tensor_parallel=layout.tensor if layout else 0,
        data_parallel=layout.data if layout else 0,
        pipeline_parallel=layout.pipeline if layout else 0,
        expert_parallel=layout.expert_width if layout else 0,
        weights_gib_per_gpu=round(memory.weights / GIB, 2) if memory else 0.0,
        kv_cache_gib_per_gpu=round(memory.kv_cache / GIB, 2) if memory else 0.0,
        activations_gib_per_gpu=round(memory.activations / GIB, 2) if memory else 0.0,
        usable_gib_per_gpu=round(memory.usable / GIB, 2) if memory else 0.0,
        message=fit.message,
    )


def placement_status(state: DesiredState) -> RenderedPlacement | None:
    placement, layout = state.placement, state.fit.layout
    if placement is None or layout is None:
        return None
    experts = state.experts
    return RenderedPlacement(
        gpu_product=state.fit.product.label if state.fit.product else None,
        gpus_per_node=layout.gpus_per_node,
        nodes_per_replica=layout.nodes,
        replicas=[
            ReplicaSummary(
                index=r.index,
                workers=[WorkerSummary(node=w.node, gpus=w.gpus) for w in r.workers],
            )
            for r in placement.replicas
        ],
        unplaced=placement.unplaced,
        reason=placement.reason,
        expert_plan_version=experts.placement.version if experts else 0,
        expert_balancer=state.expert_balancer,
        expert_balance=round(experts.balance, 4) if experts else 1.0,
    )


def build_status(
    *,
    generation: int,
    conditions: list[Condition],
    state: DesiredState | None,
    health: ServeHealth | None,
    selector: str,
    endpoint: str,
    previously_ready: int = 0,
) -> ReconciledStatus:
    """The reconciler's part of the status."""
    placed = state.placed_replicas if state else 0
    return ReconciledStatus(
        observed_generation=generation,
        conditions=conditions,
        replicas=placed,
        ready_replicas=health.ready_replicas(placed, previously_ready) if health else 0,
        selector=selector,
        endpoint=endpoint if state is not None and state.fit.fits else "",
        placement=placement_status(state) if state else None,
        fit=fit_status(state) if state else None,
    )
