"""Where each `LLMServer` replica serves its metrics, for Prometheus HTTP service discovery.

Replicas of one application listen on ports of their own (`metrics_port: 0` picks a free one),
so no static scrape config can find them. Each replica registers `host:port` in Ray's internal
key-value store (GCS), keyed by application and replica actor name; the ingress lists the
entries whose actor is still alive (a replica that died or was scaled away cannot unregister
itself reliably, so liveness is checked on read and dead entries are dropped).
"""

from __future__ import annotations

import json
import logging

import ray
from ray.experimental import internal_kv
from ray.serve import get_replica_context
from ray.serve._private.constants import SERVE_NAMESPACE

logger = logging.getLogger(__name__)

KV_NAMESPACE = "llama4_metrics_targets"


def _prefix(app_name: str) -> str:
    return f"{app_name}/"


def register(address: str) -> None:
    """Announce this replica's metrics address (call from inside a Serve replica)."""
    app_name = get_replica_context().app_name
    actor_name = ray.get_runtime_context().get_actor_name()
    if not actor_name:
        raise RuntimeError("metrics targets register only from inside a named Serve replica")
    # Serve's controller names its replica actors in Serve's own namespace; the runtime
    # context's namespace is the deploying job's, where the actor cannot be looked up.
    value = json.dumps({"address": address, "namespace": SERVE_NAMESPACE})
    internal_kv._internal_kv_put(
        _prefix(app_name) + actor_name, value, overwrite=True, namespace=KV_NAMESPACE
    )


def _alive(actor_name: str, namespace: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return False
    return True


def live_targets(app_name: str) -> list[str]:
    """`host:port` of every live replica of the application, sorted; dead entries are removed."""
    prefix = _prefix(app_name)
    targets: list[str] = []
    for raw_key in internal_kv._internal_kv_list(prefix, namespace=KV_NAMESPACE):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        try:
            entry = json.loads(raw) if raw is not None else None
            address, namespace = str(entry["address"]), str(entry["namespace"])
        except (TypeError, KeyError, ValueError):
            entry = None
        if entry is None or not _alive(key.removeprefix(prefix), namespace):
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        targets.append(address)
    return sorted(targets)


def service_discovery(app_name: str, labels: dict[str, str]) -> list[dict[str, object]]:
    """Prometheus HTTP service-discovery JSON: one target group (none when no replica lives)."""
    targets = live_targets(app_name)
    if not targets:
        return []
    return [{"targets": targets, "labels": {"llama4_app": app_name, **labels}}]
