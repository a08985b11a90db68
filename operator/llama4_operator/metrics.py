"""The operator's own Prometheus metrics (prefix `llama4_operator_`), served on a port.

Per-deployment gauges are keyed by namespace and name and removed when the deployment goes, so
`llama4_operator_deployments` always counts the resources the operator currently manages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Fits")
CONDITION_STATUSES = ("True", "False", "Unknown")

RECONCILE_DURATION = Histogram(
    "llama4_operator_reconcile_duration_seconds",
    "Time one reconciliation of a Llama4Deployment took.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "llama4_operator_reconcile_errors_total",
    "Reconciliations that ended in an error, by kind (temporary, permanent, unexpected).",
    ["kind"],
    registry=REGISTRY,
)
FIT_FAILURES = Counter(
    "llama4_operator_fit_failures_total",
    "Reconciliations that found the model does not fit the cluster's GPUs.",
    registry=REGISTRY,
)
DEPLOYMENTS = Gauge(
    "llama4_operator_deployments",
    "Managed Llama4Deployments by condition type and status.",
    ["condition", "status"],
    registry=REGISTRY,
)
EXPERT_BALANCE = Gauge(
    "llama4_operator_expert_balance_ratio",
    "Balance of the current expert plan: mean GPU expert load over the busiest GPU's (1 best); "
    "on the last measured window of routed tokens once the rebalance loop measured one, else "
    "under uniform load.",
    ["namespace", "name"],
    registry=REGISTRY,
)
EXPERT_REBALANCES = Counter(
    "llama4_operator_expert_rebalances_total",
    "Expert rebalances the operator made on measured load.",
    ["namespace", "name"],
    registry=REGISTRY,
)
READY_REPLICAS = Gauge(
    "llama4_operator_ready_replicas",
    "Replicas of a Llama4Deployment that serve (its status.readyReplicas).",
    ["namespace", "name"],
    registry=REGISTRY,
)
GPUS = Gauge(
    "llama4_operator_gpus",
    "GPUs the placed replicas of a Llama4Deployment hold (for cost per token).",
    ["namespace", "name"],
    registry=REGISTRY,
)
AUTOSCALER_DESIRED_REPLICAS = Gauge(
    "llama4_autoscaler_desired_replicas",
    "Replicas the autoscaler last asked for (spec.replicas once applied; advice only in "
    "advisory mode).",
    ["namespace", "name"],
    registry=REGISTRY,
)
AUTOSCALER_CURRENT_REPLICAS = Gauge(
    "llama4_autoscaler_current_replicas",
    "spec.replicas when the autoscaler last decided: what runs, against what it asked for.",
    ["namespace", "name"],
    registry=REGISTRY,
)
AUTOSCALER_ADVISORY = Gauge(
    "llama4_autoscaler_advisory",
    "1 when the autoscaler only advises (spec.autoscaling.mode: advisory), 0 when it applies.",
    ["namespace", "name"],
    registry=REGISTRY,
)
AUTOSCALER_MAX_REPLICAS = Gauge(
    "llama4_autoscaler_max_replicas",
    "The autoscaler's upper bound (spec.autoscaling.maxReplicas).",
    ["namespace", "name"],
    registry=REGISTRY,
)
AUTOSCALER_DECISIONS = Counter(
    "llama4_autoscaler_decisions",
    "Autoscaling decisions, one per autoscaler tick, by reason (scale_up_burst, hold_stable, ...).",
    ["namespace", "name", "reason"],
    registry=REGISTRY,
)
_PER_DEPLOYMENT = (
    EXPERT_BALANCE,
    EXPERT_REBALANCES,
    READY_REPLICAS,
    GPUS,
    AUTOSCALER_DESIRED_REPLICAS,
    AUTOSCALER_CURRENT_REPLICAS,
    AUTOSCALER_ADVISORY,
    AUTOSCALER_MAX_REPLICAS,
)
# (namespace, name) -> reasons counted, so that `forget` can remove each labelled series.
_decision_reasons: dict[tuple[str, str], set[str]] = {}

for _kind in ("temporary", "permanent", "unexpected"):
    RECONCILE_ERRORS.labels(kind=_kind)  # exported as 0 from the start, so rates work

# (namespace, name) -> {condition type: status}; the DEPLOYMENTS gauge is recomputed from it.
_conditions: dict[tuple[str, str], dict[str, str]] = {}


def record_conditions(namespace: str, name: str, conditions: Mapping[str, str]) -> None:
    """Remember a deployment's condition statuses and refresh the per-condition gauge."""
    _conditions[(namespace, name)] = dict(conditions)
    _refresh_deployments()


def record_capacity(namespace: str, name: str, *, ready_replicas: int, gpus: int) -> None:
    """What a deployment serves with: ready replicas and the GPUs its placed replicas hold."""
    READY_REPLICAS.labels(namespace, name).set(ready_replicas)
    GPUS.labels(namespace, name).set(gpus)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted deployment from every per-deployment metric."""
    _conditions.pop((namespace, name), None)
    _refresh_deployments()
    for gauge in _PER_DEPLOYMENT:
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    forget_autoscaler(namespace, name)


def record_autoscaling(
    namespace: str,
    name: str,
    *,
    desired_replicas: int,
    current_replicas: int,
    max_replicas: int,
    reason: str,
    advisory: bool = False,
) -> None:
    """One autoscaling decision: the replicas asked for and running, the bound, and why."""
    AUTOSCALER_DESIRED_REPLICAS.labels(namespace, name).set(desired_replicas)
    AUTOSCALER_CURRENT_REPLICAS.labels(namespace, name).set(current_replicas)
    AUTOSCALER_ADVISORY.labels(namespace, name).set(1 if advisory else 0)
    AUTOSCALER_MAX_REPLICAS.labels(namespace, name).set(max_replicas)
    AUTOSCALER_DECISIONS.labels(namespace, name, reason).inc()
    _decision_reasons.setdefault((namespace, name), set()).add(reason)


def forget_autoscaler(namespace: str, name: str) -> None:
    """Drop a deployment's autoscaler series (deleted, or autoscaling turned off)."""
    for gauge in (
        AUTOSCALER_DESIRED_REPLICAS,
        AUTOSCALER_CURRENT_REPLICAS,
        AUTOSCALER_ADVISORY,
        AUTOSCALER_MAX_REPLICAS,
    ):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for reason in _decision_reasons.pop((namespace, name), set()):
        with contextlib.suppress(KeyError):
            AUTOSCALER_DECISIONS.remove(namespace, name, reason)


def _refresh_deployments() -> None:
    for condition in CONDITION_TYPES:
        for status in CONDITION_STATUSES:
            count = sum(1 for c in _conditions.values() if c.get(condition) == status)
            DEPLOYMENTS.labels(condition=condition, status=status).set(count)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve the metrics on http://address:port/metrics from a daemon thread."""
    start_http_server(port, addr=address, registry=REGISTRY)
