"""Live serving metrics of one deployment: raw counters per replica, read from Prometheus or
straight from the replicas.

Two sources, one shape (`ServingSnapshot`): `PrometheusSource` runs PromQL instant queries over
Prometheus' HTTP API, selecting the deployment's series by the `namespace` and
`llama4_deployment` labels (the operator's scrape-target labels; series scraped without them are
matched by `model_name`, the served model name) and grouping them by `instance` (one serving
replica); `DirectSource` asks the deployment's OpenAI ingress for its live replicas (`GET
/-/metrics/targets`, Prometheus HTTP service-discovery JSON) and scrapes each replica's
`/metrics`. Turning two snapshots into rates is pure: the snapshot types and counter arithmetic
live in `planners.serving_snapshot`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llama4_operator.api.models import DEPLOYMENT_SERIES_LABEL
from llama4_operator.planners.serving_snapshot import ReplicaCounters, ServingSnapshot
from llama4_serving.config import QUEUE_PATH

__all__ = [
    "DeploymentTarget",
    "DirectSource",
    "MetricsUnavailable",
    "PrometheusSource",
    "ReplicaCounters",
    "ServingMetricsSource",
    "ServingSnapshot",
]

TIMEOUT_S = 10.0
TARGETS_PATH = "/-/metrics/targets"

PROMPT_TOKENS = "llama4_prompt_tokens_total"
GENERATION_TOKENS = "llama4_generation_tokens_total"
WAITING_PROMPT_TOKENS = "llama4_prompt_tokens_waiting"
RUNNING_REQUESTS = "llama4_requests_running"
ROUTED_TOKENS = "llama4_expert_routed_tokens_total"

# The vllm engine's own series, as Ray's metrics agent exports vLLM's `vllm:*` metrics under Ray
# Serve LLM (`ray_` prefix, `:` as `_`), one set per engine replica (label `ReplicaId`). vLLM
# counts waiting requests, not their prompt tokens: the backlog is waiting requests times the
# replica's mean prompt length so far.
VLLM_REPLICA_LABEL = "ReplicaId"
VLLM_PROMPT_TOKENS = "ray_vllm_prompt_tokens_total"
VLLM_GENERATION_TOKENS = "ray_vllm_generation_tokens_total"
VLLM_WAITING_REQUESTS = "ray_vllm_num_requests_waiting"
VLLM_RUNNING_REQUESTS = "ray_vllm_num_requests_running"
VLLM_PROMPT_LENGTH = "ray_vllm_request_prompt_tokens"  # histogram: _sum and _count


# One TLS context for every client: building one per request costs more than the request when
# a timer reads 100 deployments.
_TLS = ssl.create_default_context()


@dataclass(frozen=True)
class DeploymentTarget:
    """Which deployment's serving metrics to read."""

    namespace: str
    name: str
    """The Llama4Deployment's name."""
    served_model_name: str
    """Value of the `model_name` label on the serving metrics."""
    endpoint: str
    """status.endpoint (OpenAI base URL); the direct source discovers replicas from it."""
    engine: str = "reference"
    """spec.engine.name: which series the replicas export."""


class MetricsUnavailable(Exception):  # noqa: N818 - the shared interface fixes this name
    """No usable reading; str(error) says why (for status and events)."""


class ServingMetricsSource(Protocol):
    """Where live serving metrics come from."""

    description: str
    """Short, for status: e.g. 'prometheus http://prom:9090' or 'direct'."""

    async def snapshot(self, target: DeploymentTarget, *, routed: bool = True) -> ServingSnapshot:
        """Every live replica's counters now (`routed`: with the per-expert routed tokens, the
        largest part, which only the rebalance loop reads); raises MetricsUnavailable."""
        ...

    async def waiting_requests(self, target: DeploymentTarget) -> int:
        """Generation requests the deployment's ingress holds unanswered (`GET /-/queue`), the
        one demand a deployment scaled to zero shows; raises MetricsUnavailable."""
        ...


# Series read once per replica (summed over their other labels).
_PER_REPLICA = (PROMPT_TOKENS, GENERATION_TOKENS, WAITING_PROMPT_TOKENS, RUNNING_REQUESTS)


class _Builder:
    """Accumulates values per instance, then freezes them into ReplicaCounters."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {}
        self.routed: dict[str, dict[tuple[int, int], float]] = {}

    def add(self, instance: str, metric: str, labels: Mapping[str, str], value: float) -> None:
        if metric == ROUTED_TOKENS:
            try:
                key = (int(labels["layer"]), int(labels["expert"]))
            except (KeyError, ValueError):
                return  # not a series this module understands
            per_instance = self.routed.setdefault(instance, {})
            per_instance[key] = per_instance.get(key, 0.0) + value
            self.values.setdefault(instance, {})
            return
        per_metric = self.values.setdefault(instance, {})
        per_metric[metric] = per_metric.get(metric, 0.0) + value

    def build(self, time_s: float) -> ServingSnapshot:
        replicas = {
            instance: ReplicaCounters(
                prompt_tokens=values.get(PROMPT_TOKENS, 0.0),
                generation_tokens=values.get(GENERATION_TOKENS, 0.0),
                waiting_prompt_tokens=values.get(WAITING_PROMPT_TOKENS, 0.0),
                running_requests=values.get(RUNNING_REQUESTS, 0.0),
                routed_tokens=dict(self.routed.get(instance, {})),
            )
            for instance, values in self.values.items()
        }
        return ServingSnapshot(time_s=time_s, replicas=replicas)


def _promql_string(value: str) -> str:
    """A PromQL double-quoted string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PrometheusSource:
    """Instant PromQL queries against a Prometheus server's HTTP API."""

    def __init__(self, url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.description = f"prometheus {self.url}"
        self._transport = transport

    def queries(self, target: DeploymentTarget, *, routed: bool = True) -> dict[str, str]:
        """Metric name -> PromQL selecting this deployment's series, grouped by replica.

        Two deployments may serve the same model name, so series are selected by the
        deployment label the operator puts on its scrape targets; series scraped without it (a
        scrape configuration of the user's own) fall back to the served model name."""
        if target.engine == "vllm":
            return vllm_queries(target)
        namespace = f"namespace={_promql_string(target.namespace)}"
        selectors = (
            f"{namespace},{DEPLOYMENT_SERIES_LABEL}={_promql_string(target.name)}",
            f'{namespace},{DEPLOYMENT_SERIES_LABEL}="",'
            f"model_name={_promql_string(target.served_model_name)}",
        )

        def grouped(metric: str, by: str) -> str:
            return " or ".join(f"sum by ({by}) ({metric}{{{s}}})" for s in selectors)

        queries = {name: grouped(name, "instance") for name in _PER_REPLICA}
        if routed:
            queries[ROUTED_TOKENS] = grouped(ROUTED_TOKENS, "instance, layer, expert")
        return queries

    async def waiting_requests(self, target: DeploymentTarget) -> int:
        return await read_waiting_requests(target, self._transport)

    async def snapshot(self, target: DeploymentTarget, *, routed: bool = True) -> ServingSnapshot:
        builder = _Builder()
        queries = self.queries(target, routed=routed)
        read_at = time.time()
        try:
            async with httpx.AsyncClient(
                base_url=self.url, timeout=TIMEOUT_S, transport=self._transport, verify=_TLS
            ) as http:
                results = await asyncio.gather(
                    *(self._query(http, query) for query in queries.values())
                )
        except (httpx.HTTPError, ValueError) as error:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {error}") from error
        replica_label = VLLM_REPLICA_LABEL if target.engine == "vllm" else "instance"
        for metric, series in zip(queries, results, strict=True):
            for labels, value in series:
                instance = labels.get(replica_label, "")
                if instance:
                    builder.add(instance, metric, labels, value)
        snapshot = builder.build(read_at)
        if not snapshot.replicas:
            tokens = VLLM_PROMPT_TOKENS if target.engine == "vllm" else PROMPT_TOKENS
            raise MetricsUnavailable(
                f"Prometheus at {self.url} has no {tokens} series for "
                f"namespace={target.namespace!r} {DEPLOYMENT_SERIES_LABEL}={target.name!r} "
                f"(or, unlabelled, model_name={target.served_model_name!r}): "
                "is it scraping the replicas?"
            )
        return snapshot

    async def _query(
        self, http: httpx.AsyncClient, query: str
    ) -> list[tuple[dict[str, str], float]]:
        response = await http.get("/api/v1/query", params={"query": query})
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise MetricsUnavailable(
                f"Prometheus at {self.url} refused {query!r}: {body.get('error', body)}"
            )
        return [_instant_value(item) for item in body.get("data", {}).get("result", [])]


def vllm_queries(target: DeploymentTarget) -> dict[str, str]:
    """The vllm engine's queries, grouped by `ReplicaId`. Its series carry the deployment label
    where the operator's ServiceMonitor scrapes them (RayService mode); a shared Ray cluster's
    metrics agents (external-Ray mode) give only the served model name, and `namespace` where
    the scrape adds it. No per-expert series: vLLM exports none."""
    labelled = (
        f"namespace={_promql_string(target.namespace)},"
        f"{DEPLOYMENT_SERIES_LABEL}={_promql_string(target.name)}"
    )
    # A namespace is a DNS label: nothing in it is special to a regular expression.
    by_model = (
        f'{DEPLOYMENT_SERIES_LABEL}="",model_name={_promql_string(target.served_model_name)},'
        f"namespace=~{_promql_string(target.namespace + '|')}"
    )
    by = VLLM_REPLICA_LABEL

    def summed(metric: str, selector: str) -> str:
        return f"sum by ({by}) ({metric}{{{selector}}})"

    def waiting_tokens(selector: str) -> str:
        prompt_length = (
            f"{summed(VLLM_PROMPT_LENGTH + '_sum', selector)} / "
            f"clamp_min({summed(VLLM_PROMPT_LENGTH + '_count', selector)}, 1)"
        )
        return f"{summed(VLLM_WAITING_REQUESTS, selector)} * on ({by}) ({prompt_length})"

    def either(query: Callable[[str], str]) -> str:
        return f"({query(labelled)}) or ({query(by_model)})"

    return {
        PROMPT_TOKENS: either(lambda s: summed(VLLM_PROMPT_TOKENS, s)),
        GENERATION_TOKENS: either(lambda s: summed(VLLM_GENERATION_TOKENS, s)),
        WAITING_PROMPT_TOKENS: either(waiting_tokens),
        RUNNING_REQUESTS: either(lambda s: summed(VLLM_RUNNING_REQUESTS, s)),
    }


def _instant_value(item: Mapping[str, Any]) -> tuple[dict[str, str], float]:
    labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
    _, value = item.get("value", (0, "0"))
    return labels, float(value)


def ingress_url(endpoint: str, path: str) -> str:
    """A route of the ingress (`path`, e.g. /-/queue) from the OpenAI base URL (ending in /v1)."""
    return endpoint.rstrip("/").removesuffix("/v1") + path


def targets_url(endpoint: str) -> str:
    """The ingress' service-discovery URL from the OpenAI base URL."""
    return ingress_url(endpoint, TARGETS_PATH)


async def read_waiting_requests(
    target: DeploymentTarget, transport: httpx.AsyncBaseTransport | None = None
) -> int:
    """`waiting_requests` of both sources: the ingress answers it, whichever engine runs."""
    if not target.endpoint:
        raise MetricsUnavailable("the deployment has no endpoint yet (status.endpoint)")
    url = ingress_url(target.endpoint, QUEUE_PATH)
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S, transport=transport, verify=_TLS) as http:
            response = await http.get(url)
            response.raise_for_status()
            return int(response.json()["waiting_requests"])
    except (httpx.HTTPError, ValueError, TypeError, KeyError) as error:
        raise MetricsUnavailable(f"waiting requests at {url}: {error!r}") from error


def parse_targets(body: Any) -> list[str]:
    """host:port of every target in a Prometheus HTTP service-discovery document."""
    if not isinstance(body, list):
        raise TypeError("expected a JSON list of target groups")
    targets: list[str] = []
    for group in body:
        if isinstance(group, Mapping):
            targets.extend(str(t) for t in group.get("targets") or [])
    return targets


def parse_exposition(text: str, model_name: str, *, routed: bool = True) -> ReplicaCounters | None:
    """One replica's counters from its Prometheus text exposition (None: no series of
    `model_name` in it)."""
    builder = _Builder()
    wanted = {*_PER_REPLICA, ROUTED_TOKENS} if routed else set(_PER_REPLICA)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model_name") == model_name:
                builder.add("replica", sample.name, sample.labels, sample.value)
    snapshot = builder.build(0.0)
    return snapshot.replicas.get("replica")


class DirectSource:
    """Scrapes the replicas the ingress lists, without a Prometheus in between."""

    description = "direct"

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    async def waiting_requests(self, target: DeploymentTarget) -> int:
        return await read_waiting_requests(target, self._transport)

    async def snapshot(self, target: DeploymentTarget, *, routed: bool = True) -> ServingSnapshot:
        if target.engine == "vllm":
            raise MetricsUnavailable(
                "the vllm engine's series are exported by Ray's metrics agents, not listed by "
                "its ingress: run the operator with --prometheus-url (a Prometheus scraping them)"
            )
        if not target.endpoint:
            raise MetricsUnavailable("the deployment has no endpoint yet (status.endpoint)")
        discovery = targets_url(target.endpoint)
        async with httpx.AsyncClient(
            timeout=TIMEOUT_S, transport=self._transport, verify=_TLS
        ) as http:
            try:
                response = await http.get(discovery)
                response.raise_for_status()
                instances = parse_targets(response.json())
            except (httpx.HTTPError, ValueError, TypeError) as error:
                raise MetricsUnavailable(f"replica discovery at {discovery}: {error}") from error
            if not instances:
                raise MetricsUnavailable(f"replica discovery at {discovery} lists no replicas")
            read_at = time.time()
            scraped = await asyncio.gather(
                *(
                    self._scrape(http, instance, target.served_model_name, routed)
                    for instance in instances
                )
            )
        replicas = {i: c for i, c in zip(instances, scraped, strict=True) if c is not None}
        if not replicas:
            raise MetricsUnavailable(
                f"none of the {len(instances)} replicas listed at {discovery} could be scraped "
                f"for model_name={target.served_model_name!r}"
            )
        return ServingSnapshot(time_s=read_at, replicas=replicas)

    @staticmethod
    async def _scrape(
        http: httpx.AsyncClient, instance: str, model_name: str, routed: bool
    ) -> ReplicaCounters | None:
        """One replica's counters; None when it cannot be read (it may be going away)."""
        try:
            response = await http.get(f"http://{instance}/metrics")
            response.raise_for_status()
            return parse_exposition(response.text, model_name, routed=routed)
        except (httpx.HTTPError, ValueError):
            return None


def source_for(prometheus_url: str | None) -> ServingMetricsSource:
    """Prometheus when the operator has its URL, else the replicas themselves."""
    return PrometheusSource(prometheus_url) if prometheus_url else DirectSource()
