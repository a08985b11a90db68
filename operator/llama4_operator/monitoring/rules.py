"""Prometheus recording rules and alerts for Llama4Deployments, as plain data.

Recorded series follow the kubernetes-mixin naming (`level:metric:operations`) and are keyed by
`namespace` and `name` (the Llama4Deployment). The SLO burn alerts are the multi-window,
multi-burn-rate alerts of the Google SRE Workbook, chapter "Alerting on SLOs": page at 14.4x the
budget rate over 1 h and 5 m (2 % of a 30-day budget in an hour), ticket at 6x over 6 h and 30 m.
"""

from __future__ import annotations

from typing import Any

from llama4_operator.api.models import DEPLOYMENT_SERIES_LABEL
from llama4_operator.monitoring.selectors import Selectors

RUNBOOK_BASE = "https://github.com/llama4-operator/llama4-operator/blob/main/docs/runbooks.md"
ERROR_RATIO_WINDOWS = ("5m", "30m", "1h", "6h")
FAST_BURN = 14.4
SLOW_BURN = 6.0

# Metrics the operator exports (llama4_operator.metrics); alerts and dashboards read these names.
DESIRED_REPLICAS = "llama4_autoscaler_desired_replicas"  # gauge {namespace, name}
MAX_REPLICAS = "llama4_autoscaler_max_replicas"  # gauge {namespace, name}
# gauge {namespace, name}: spec.replicas at the autoscaler's last decision (what runs)
CURRENT_REPLICAS = "llama4_autoscaler_current_replicas"
ADVISORY = "llama4_autoscaler_advisory"  # gauge {namespace, name}: 1 in advisory mode
AUTOSCALER_DECISIONS = "llama4_autoscaler_decisions_total"  # counter {namespace, name, reason}
READY_REPLICAS = "llama4_operator_ready_replicas"  # gauge {namespace, name}
DEPLOYMENT_GPUS = "llama4_operator_gpus"  # gauge {namespace, name}: GPUs the replicas hold
EXPERT_REBALANCES = "llama4_operator_expert_rebalances_total"  # counter {namespace, name}
# Recorded series the dashboards and the demo read, keyed by the Llama4Deployment.
GENERATED_TOKENS_RATE = "namespace_name:llama4_generation_tokens:rate5m"
ROUTED_TOKENS_RATE = "namespace_name_layer_expert:llama4_expert_routed_tokens:rate5m"
KV_CACHE_USAGE = "namespace_name:llama4_kv_cache_usage_ratio:max"
REQUESTS_WAITING = "namespace_name:llama4_requests_waiting:sum"

Rule = dict[str, Any]


def _by_deployment(inner: str, extra: str = "", aggregation: str = "sum") -> str:
    """Sum (or `aggregation`) the serving series `inner` by namespace and Llama4Deployment: the
    `llama4_deployment` label the operator attaches to their targets, or, on series scraped
    without it, the served model name (which defaults to the deployment's name)."""
    keys = ", ".join(k for k in ("namespace", "name", extra) if k)
    named = f'label_replace({inner}, "name", "$1", "model_name", "(.*)")'
    # The regex (.+) leaves `name` alone where the deployment label is absent or empty.
    named = f'label_replace({named}, "name", "$1", "{DEPLOYMENT_SERIES_LABEL}", "(.+)")'
    return f"{aggregation} by ({keys}) ({named})"


# The same quantities in the vllm engine's own series (vLLM's `vllm:*` metrics as Ray's metrics
# agent exports them under Ray Serve LLM) and the reference engine's; a deployment runs one.
VLLM_SERIES = {
    "llama4_generation_tokens_total": "ray_vllm_generation_tokens_total",
    "llama4_prompt_tokens_total": "ray_vllm_prompt_tokens_total",
    "llama4_requests_total": "ray_vllm_request_success_total",
    "llama4_time_to_first_token_seconds_bucket": "ray_vllm_time_to_first_token_seconds_bucket",
    "llama4_time_per_output_token_seconds_bucket": (
        "ray_vllm_request_time_per_output_token_seconds_bucket"
    ),
    # vLLM's `kv_cache_usage_perc` is a ratio too (0..1), despite its name.
    "llama4_kv_cache_usage_ratio": "ray_vllm_kv_cache_usage_perc",
    "llama4_requests_waiting": "ray_vllm_num_requests_waiting",
}
# The label naming why a request finished: the reference engine's and vLLM's.
FINISH_LABELS = ("finish_reason", "finished_reason")


def _series(metric: str, sel: str, extra: str = "") -> str:
    """A selector of `metric` from either engine."""
    names = "|".join((metric, VLLM_SERIES[metric]))
    return f'{{__name__=~"{names}",{sel}{extra}}}'


def recording_rules(sel: Selectors) -> list[Rule]:
    s = sel.serving
    rules: list[Rule] = [
        {
            "record": GENERATED_TOKENS_RATE,
            "expr": _by_deployment(f"rate({_series('llama4_generation_tokens_total', s)}[5m])"),
        },
        {
            "record": "namespace_name:llama4_prompt_tokens:rate5m",
            "expr": _by_deployment(f"rate({_series('llama4_prompt_tokens_total', s)}[5m])"),
        },
        {
            "record": "namespace_name:llama4_requests:rate5m",
            "expr": _by_deployment(f"rate({_series('llama4_requests_total', s)}[5m])"),
        },
        {
            # The busiest replica's: the first to run out of KV cache and queue requests.
            "record": KV_CACHE_USAGE,
            "expr": _by_deployment(_series("llama4_kv_cache_usage_ratio", s), aggregation="max"),
        },
        {
            "record": REQUESTS_WAITING,
            "expr": _by_deployment(_series("llama4_requests_waiting", s)),
        },
    ]
    for window in ERROR_RATIO_WINDOWS:
        failed = [
            _series("llama4_requests_total", s, f',{label}="error"') for label in FINISH_LABELS
        ]
        errors = " or ".join(_by_deployment(f"rate({f}[{window}])") for f in failed)
        total = _by_deployment(f"rate({_series('llama4_requests_total', s)}[{window}])")
        rules.append(
            {
                # `or ... * 0`: a deployment without a single failure has no error series; its
                # ratio is 0, not missing.
                "record": f"namespace_name:llama4_request_error_ratio:rate{window}",
                "expr": f"(\n{errors}\nor\n{total} * 0\n)\n/\n{total}",
            }
        )
    for histogram in ("llama4_time_to_first_token_seconds", "llama4_time_per_output_token_seconds"):
        buckets = _series(f"{histogram}_bucket", s)
        rules.append(
            {
                "record": f"namespace_name_le:{histogram}_bucket:rate5m",
                "expr": _by_deployment(f"rate({buckets}[5m])", "le"),
            }
        )
    routed = ROUTED_TOKENS_RATE
    rules += [
        {
            "record": routed,
            "expr": _by_deployment(
                f"rate(llama4_expert_routed_tokens_total{{{s}}}[5m])", "layer, expert"
            ),
        },
        {
            # Mean over busiest expert of each layer: 1 is perfect balance, 1/experts is worst.
            "record": "namespace_name_layer:llama4_expert_balance:ratio_rate5m",
            "expr": (
                f"avg by (namespace, name, layer) ({routed})\n/\n"
                f"max by (namespace, name, layer) ({routed})"
            ),
        },
    ]
    return rules


def _alert(name: str, expr: str, duration: str, severity: str, summary: str, desc: str) -> Rule:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": desc,
            "runbook_url": f"{RUNBOOK_BASE}#{name.lower()}",
        },
    }


def alerts(sel: Selectors) -> list[Rule]:
    o = sel.operator
    budget = sel.error_budget()
    fast, slow = round(FAST_BURN * budget, 6), round(SLOW_BURN * budget, 6)
    ratio = "namespace_name:llama4_request_error_ratio:rate"
    return [
        _alert(
            "Llama4DeploymentNotReady",
            f'sum(llama4_operator_deployments{{{o},condition="Ready",status="False"}}) > 0',
            "15m",
            "warning",
            "Llama4Deployments have not been Ready for 15 minutes.",
            "{{ $value }} Llama4Deployment(s) report Ready=False; "
            "`kubectl get l4d -A` shows which and why.",
        ),
        _alert(
            "Llama4ErrorBudgetBurnFast",
            f"{ratio}1h > {fast}\nand\n{ratio}5m > {fast}",
            "2m",
            "critical",
            "{{ $labels.namespace }}/{{ $labels.name }} burns its error budget 14.4x too fast.",
            f"More than {fast:.2%} of requests failed over the last hour "
            f"(SLO {sel.availability_slo:.2%}).",
        ),
        _alert(
            "Llama4ErrorBudgetBurnSlow",
            f"{ratio}6h > {slow}\nand\n{ratio}30m > {slow}",
            "15m",
            "warning",
            "{{ $labels.namespace }}/{{ $labels.name }} burns its error budget 6x too fast.",
            f"More than {slow:.2%} of requests failed over the last 6 hours "
            f"(SLO {sel.availability_slo:.2%}).",
        ),
        _alert(
            "Llama4ExpertImbalanceHigh",
            f"namespace_name_layer:llama4_expert_balance:ratio_rate5m < {sel.imbalance_threshold}",
            "30m",
            "warning",
            "{{ $labels.namespace }}/{{ $labels.name }} layer {{ $labels.layer }} routes unevenly.",
            "Mean expert load is {{ $value | humanizePercentage }} of the busiest expert's "
            f"(alert below {sel.imbalance_threshold:.0%}).",
        ),
        _alert(
            "Llama4AutoscalerPinnedAtMax",
            f"{DESIRED_REPLICAS}{{{o}}}\n>= on (namespace, name)\n{MAX_REPLICAS}{{{o}}}",
            "30m",
            "warning",
            "{{ $labels.namespace }}/{{ $labels.name }} wants more replicas than allowed.",
            "The autoscaler has asked for its maximum of {{ $value }} replicas for 30 minutes.",
        ),
        _alert(
            "Llama4OperatorMetricsMissing",
            f"absent(up{{{o}}} == 1)",
            "10m",
            "warning",
            "Prometheus scrapes no llama4-operator instance.",
            "No target matching {" + o + "} has been up for 10 minutes; the other alerts "
            "cannot fire.",
        ),
        _alert(
            "Llama4ServingMetricsMissing",
            f'sum(llama4_operator_deployments{{{o},condition="Ready",status="True"}}) > 0\n'
            f"unless on ()\ncount(llama4_requests_running{{{sel.serving}}}) > 0",
            "15m",
            "warning",
            "Ready Llama4Deployments export no serving metrics.",
            "Deployments are Ready but no serving replica is scraped: check the ServiceMonitor "
            "(spec.monitoring) and the Prometheus selectors.",
        ),
    ]


def rule_groups(sel: Selectors) -> dict[str, Any]:
    """The rules file (`groups:`), also the spec of the chart's PrometheusRule."""
    return {
        "groups": [
            {"name": "llama4.rules", "interval": "30s", "rules": recording_rules(sel)},
            {"name": "llama4.alerts", "rules": alerts(sel)},
        ]
    }
