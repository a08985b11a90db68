"""Replica discovery for Prometheus on the real local Ray cluster: the ingress lists every live
LLMServer replica's metrics address as HTTP service-discovery JSON, drops replicas that are
gone, and each listed address serves the replica's metrics (the backlog gauge included)."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.experimental import internal_kv
from serving_cluster import APP, MODEL, ServingCluster

from llama4_serving.metrics_targets import KV_NAMESPACE


def _targets(base_url: str) -> list[dict[str, object]]:
    response = httpx.get(f"{base_url}/-/metrics/targets", timeout=30)
    assert response.status_code == 200, response.text
    groups: list[dict[str, object]] = response.json()
    return groups


def test_ingress_lists_live_replicas_for_prometheus(serving_cluster: ServingCluster) -> None:
    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    host, port = handle.metrics_address.remote().result(timeout_s=30)
    # A replica that died without unregistering: its actor no longer exists.
    gone = f"{APP}/SERVE_REPLICA::{APP}#LLMServer#gone"
    internal_kv._internal_kv_put(
        gone,
        json.dumps({"address": "127.0.0.1:1", "namespace": "serve"}),
        namespace=KV_NAMESPACE,
    )

    (group,) = _targets(serving_cluster.base_url)
    assert group["targets"] == [f"{host}:{port}"]
    assert group["labels"] == {"llama4_app": APP}
    assert not internal_kv._internal_kv_exists(gone, namespace=KV_NAMESPACE)

    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    waiting = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "llama4_prompt_tokens_waiting"
    ]
    assert [(s.labels, s.value) for s in waiting] == [({"model_name": MODEL}, 0.0)]  # idle
