"""Issue 7's monitoring acceptance, serving side: a real Prometheus scrapes the real Serve app's
replica, evaluates the generated rules, and every serving-side recording rule and dashboard
query returns data. (Operator-side queries run in tests/integration/test_helm_install.py.)"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import openai
from prometheus_server import prometheus
from ray import serve
from serving_cluster import API_KEY, APP, MODEL, ServingCluster

from llama4_operator.monitoring import dashboards, rules
from llama4_operator.monitoring.selectors import Selectors
from support import wait_for

NAMESPACE = "ml"  # the target label prometheus-operator would add from the Service's namespace
# Grafana variables replaced by what a user would pick for this one deployment.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": NAMESPACE, "$deployment": MODEL}
OPERATOR_METRICS = ("llama4_operator_", "llama4_autoscaler_")


def serving_dashboard_queries() -> list[str]:
    """Dashboard queries that read only serving metrics and rules recorded from them."""
    found = []
    for dashboard in dashboards.all_dashboards(Selectors()):
        for panel in dashboard.to_json()["panels"]:
            for target in panel["targets"]:
                expr: str = target["expr"]
                if any(prefix in expr for prefix in OPERATOR_METRICS):
                    continue
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append(expr)
    return found


def test_every_serving_rule_and_dashboard_query_returns_data(
    serving_cluster: ServingCluster, tmp_path: Path
) -> None:
    client = openai.OpenAI(
        base_url=f"{serving_cluster.base_url}/v1", api_key=API_KEY, timeout=60, max_retries=0
    )
    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    host, port = handle.metrics_address.remote().result(timeout_s=30)
    with prometheus(tmp_path, {"serve": (f"{host}:{port}", {"namespace": NAMESPACE})}) as prom:
        wait_for(lambda: prom.query('up{job="serve"} == 1'), 30, "Prometheus to scrape the app")
        # Requests spread over a few scrapes, so rates and quantiles have something to show.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            client.completions.create(model=MODEL, prompt="Metrics for", max_tokens=4)
        selector = f'namespace="{NAMESPACE}", name="{MODEL}"'
        for rule in rules.recording_rules(Selectors()):
            series = wait_for(
                partial(prom.query, f"{rule['record']}{{{selector}}}"),
                30,
                f"recording rule {rule['record']} to return data",
            )
            assert all(math.isfinite(float(s["value"][1])) for s in series), (rule, series)
        tokens = prom.query(f"namespace_name:llama4_generation_tokens:rate5m{{{selector}}}")
        assert float(tokens[0]["value"][1]) > 0
        errors = prom.query(f"namespace_name:llama4_request_error_ratio:rate5m{{{selector}}}")
        assert float(errors[0]["value"][1]) == 0  # every request above succeeded
        for expr in serving_dashboard_queries():
            result = wait_for(partial(prom.query, expr), 30, f"data for {expr}")
            assert any(math.isfinite(float(s["value"][1])) for s in result), (expr, result)
        prom.wait_rules_healthy()
