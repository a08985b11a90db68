"""Grafana dashboards built with a small typed builder.

Only the handful of Grafana JSON fields these dashboards use are modelled (time series, stat and
heatmap panels, Prometheus targets, template variables); uids are fixed so links survive
regeneration and re-import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama4_operator.monitoring import rules
from llama4_operator.monitoring.selectors import Selectors

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Dashboards read the operator's series and the recorded serving series, all keyed by
# `namespace` and `name` (the Llama4Deployment).
BY_NAME = 'namespace=~"$namespace", name=~"$deployment"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""

    def to_json(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": DATASOURCE,
            "expr": self.expr,
            "legendFormat": self.legend,
            "refId": ref_id,
        }


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries, stat or heatmap
    description: str = ""
    width: int = 12

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        panel: dict[str, Any] = {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": self.unit}, "overrides": []},
            "targets": [t.to_json(chr(ord("A") + i)) for i, t in enumerate(self.targets)],
        }
        if self.kind == "heatmap":
            # Each series (one layer/expert pair) is a row; no bucketing of values.
            panel["options"] = {
                "calculate": False,
                "yAxis": {"axisPlacement": "left"},
                "color": {"scheme": "Oranges", "mode": "scheme"},
                "cellGap": 1,
            }
            for target in panel["targets"]:
                target["format"] = "time_series"
        return panel


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        laid_out: list[dict[str, Any]] = []
        x = y = 0
        for index, panel in enumerate(self.panels, start=1):
            if x + panel.width > 24:
                x, y = 0, y + 8
            laid_out.append(panel.to_json(index, x, y))
            x += panel.width
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["llama4"],
            "timezone": "browser",
            "editable": True,
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": list(self.variables)},
            "panels": laid_out,
        }


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def _variables(sel: Selectors, *, price: bool) -> tuple[dict[str, Any], ...]:
    # The operator lists every deployment it manages, serving or not yet.
    namespaces = f"label_values({rules.READY_REPLICAS}{{{sel.operator}}}, namespace)"
    deployments = (
        f'label_values({rules.READY_REPLICAS}{{{sel.operator}, namespace=~"$namespace"}}, name)'
    )
    found: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        _query_variable("namespace", "Namespace", namespaces),
        _query_variable("deployment", "Deployment", deployments),
    ]
    if price:
        found.append(
            {
                "name": "gpu_hour_price",
                "label": "GPU-hour price",
                "description": "Price of one GPU for one hour, in your currency.",
                "type": "textbox",
                "query": "2.50",
                "current": {"text": "2.50", "value": "2.50"},
            }
        )
    return tuple(found)


def _quantiles(histogram: str) -> tuple[Target, ...]:
    series = f"namespace_name_le:{histogram}_bucket:rate5m{{{BY_NAME}}}"
    return tuple(
        Target(
            f"histogram_quantile({q}, {series})",
            f"{{{{namespace}}}}/{{{{name}}}} p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    )


def overview(sel: Selectors) -> Dashboard:
    """Per deployment: throughput, replicas, latency, errors, GPUs and cost."""
    legend = "{{namespace}}/{{name}}"
    tokens = f"{rules.GENERATED_TOKENS_RATE}{{{BY_NAME}}}"
    gpus = f"{rules.DEPLOYMENT_GPUS}{{{sel.operator}, {BY_NAME}}}"
    return Dashboard(
        uid=f"{sel.dashboard_prefix}-overview",
        title="Llama 4 / Overview",
        description="Llama4Deployments: throughput, replicas, latency, errors, GPUs and cost.",
        variables=_variables(sel, price=True),
        panels=(
            Panel(
                "Generated tokens/s",
                (Target(tokens, legend),),
                unit="short",
                description="Output tokens per second, 5-minute rate.",
            ),
            Panel(
                "Replicas: desired vs ready",
                (
                    Target(
                        f"{rules.DESIRED_REPLICAS}{{{sel.operator}, {BY_NAME}}}",
                        f"{legend} desired",
                    ),
                    Target(
                        f"{rules.READY_REPLICAS}{{{sel.operator}, {BY_NAME}}}",
                        f"{legend} ready",
                    ),
                ),
            ),
            Panel(
                "Time to first token",
                _quantiles("llama4_time_to_first_token_seconds"),
                unit="s",
            ),
            Panel(
                "Time per output token",
                _quantiles("llama4_time_per_output_token_seconds"),
                unit="s",
            ),
            Panel(
                "Request error ratio",
                (
                    Target(
                        f"namespace_name:llama4_request_error_ratio:rate5m{{{BY_NAME}}}",
                        legend,
                    ),
                ),
                unit="percentunit",
                description=f"Failed requests over all; the SLO allows {sel.error_budget():.2%}.",
            ),
            Panel(
                "KV-cache use, busiest replica",
                (Target(f"{rules.KV_CACHE_USAGE}{{{BY_NAME}}}", legend),),
                unit="percentunit",
                description=(
                    "Share of the KV cache in use on the deployment's fullest replica; near 100 % "
                    "requests queue (or are preempted) for cache."
                ),
            ),
            Panel(
                "Requests waiting",
                (Target(f"{rules.REQUESTS_WAITING}{{{BY_NAME}}}", legend),),
                description="Requests queued in the engines for prefill, all replicas.",
            ),
            Panel("GPUs", (Target(gpus, legend),), kind="stat", width=6),
            Panel(
                "Cost per million tokens",
                (
                    Target(
                        f"{gpus} * $gpu_hour_price / 3600\n/ on (namespace, name)\n{tokens} * 1e6",
                        legend,
                    ),
                ),
                kind="stat",
                width=6,
                description="GPUs held x GPU-hour price over generated tokens (variable above).",
            ),
        ),
    )


def moe(sel: Selectors) -> Dashboard:
    """Mixture-of-experts view: routing per layer and expert, balance, rebalances, autoscaler."""
    legend = "{{namespace}}/{{name}}"
    routed = f"sum by (layer, expert) ({rules.ROUTED_TOKENS_RATE}{{{BY_NAME}}})"
    return Dashboard(
        uid=f"{sel.dashboard_prefix}-moe",
        title="Llama 4 / Mixture of experts",
        description="Expert routing and balance, expert rebalances and autoscaler decisions.",
        variables=_variables(sel, price=False),
        panels=(
            Panel(
                "Routed tokens/s per layer and expert",
                (Target(routed, "layer {{layer}} expert {{expert}}"),),
                kind="heatmap",
                width=24,
                description="One row per (layer, expert); an even colour per layer is balanced.",
            ),
            Panel(
                "Measured balance per layer",
                (
                    Target(
                        f"namespace_name_layer:llama4_expert_balance:ratio_rate5m{{{BY_NAME}}}",
                        f"{legend} layer {{{{layer}}}}",
                    ),
                ),
                unit="percentunit",
                description="Mean over busiest expert's load (1 = even).",
            ),
            Panel(
                "Planned balance",
                (
                    Target(
                        f"llama4_operator_expert_balance_ratio{{{sel.operator}, {BY_NAME}}}",
                        legend,
                    ),
                ),
                unit="percentunit",
                description="Balance of the operator's current expert placement plan.",
            ),
            Panel(
                "Expert rebalances",
                (
                    Target(
                        f"increase({rules.EXPERT_REBALANCES}{{{sel.operator}, {BY_NAME}}}"
                        "[$__rate_interval])",
                        legend,
                    ),
                ),
            ),
            Panel(
                "Autoscaler decisions by reason",
                (
                    Target(
                        "sum by (namespace, name, reason) "
                        f"(increase({rules.AUTOSCALER_DECISIONS}{{{sel.operator}, {BY_NAME}}}"
                        "[$__rate_interval]))",
                        f"{legend} {{{{reason}}}}",
                    ),
                ),
            ),
            Panel(
                "Autoscaler: advised vs running replicas",
                (
                    Target(
                        f"{rules.DESIRED_REPLICAS}{{{sel.operator}, {BY_NAME}}}",
                        f"{legend} advised",
                    ),
                    Target(
                        f"{rules.CURRENT_REPLICAS}{{{sel.operator}, {BY_NAME}}}",
                        f"{legend} running (spec.replicas)",
                    ),
                    Target(
                        f"{rules.READY_REPLICAS}{{{sel.operator}, {BY_NAME}}}",
                        f"{legend} ready",
                    ),
                ),
                description=(
                    "What the policy asks for against what runs. In advisory mode "
                    "(llama4_autoscaler_advisory = 1) the gap is advice nobody applied; in "
                    "apply mode it closes within one decision."
                ),
            ),
        ),
    )


def all_dashboards(sel: Selectors) -> list[Dashboard]:
    return [overview(sel), moe(sel)]
