"""Live autoscaling end to end, every component real: the local control plane, a local Ray
cluster (a head and a worker declaring fake GPUs) running the serving app, a Prometheus that
finds the replicas through the ingress' /-/metrics/targets and scrapes them and the operator,
and the operator in external-Ray mode reading token throughput from that Prometheus.

A load generator raises token throughput until the operator scales the deployment from 1 to 2
replicas (spec.replicas, then 2 LLMServer replicas in Serve); when the load stops it goes back
to 1. Status, events and the llama4_autoscaler_* metrics (queried from Prometheus) must show
both decisions.

With minReplicas 0 an idle deployment goes to zero (no LLMServer replica in Serve), and a
request sent then is held by the ingress and answered once the replica the operator starts for
it serves.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_server import PrometheusApi, prometheus
from ray_serve import RayServe, ray_serve_cluster

from llama4_operator.devenv.cluster import LocalCluster
from llama4_operator.monitoring import dashboards, rules
from llama4_operator.monitoring.selectors import Selectors
from llama4_operator.renderers.children import Owner, external_app_name, external_route_prefix
from llama4_serving.config import is_engine_deployment
from llama4_serving.tiny import write_tokenizer
from support import REPO, Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

NAMESPACE = "autoscale-live"
NAME = "tiny"
# Served under a name of its own: dashboards and rules must still key its series by the
# resource (the cost panel joins the operator's GPU gauge and the serving tokens on `name`).
MODEL = "tiny-chat"
OWNER = Owner(name=NAME, namespace=NAMESPACE, uid="-")
APP = external_app_name(OWNER)
PREFIX = external_route_prefix(OWNER)


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    with ray_serve_cluster(tmp_path_factory.mktemp("serve")) as cluster:
        yield cluster


def llm_replicas(ray: RayServe) -> int:
    """RUNNING LLMServer replicas of the deployment's Serve application."""
    return len(ray.engine_replica_ids(APP))


def deployment(tokenizer: Path, **autoscaling: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "tiny-reference.yaml").read_text()
    )
    document["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = document["spec"]
    spec["model"]["weights"]["tokenizerPath"] = str(tokenizer)
    spec["model"]["servedModelName"] = MODEL
    spec["engine"]["extraArgs"] = {"replica_num_cpus": "0.5", "torch_threads": "1"}
    spec["replicas"] = 1
    spec["autoscaling"] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        # Far below what the tiny model serves, so a few concurrent clients overload a replica.
        "targetTokensPerSecond": 10,
        "scaleDownDelaySeconds": 20,
        "coldStartSeconds": 10,
        **autoscaling,
    }
    return document


class Load:
    """Concurrent completion requests until stopped; counts what was answered."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.stop_event = threading.Event()
        self.answered = 0
        self.failed = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop_event.is_set():
                try:
                    response = http.post(
                        self.url,
                        json={
                            "model": MODEL,
                            "prompt": "Mixture of experts route each token " * 3,
                            "max_tokens": 16,
                        },
                    )
                    if response.is_success:
                        self.answered += 1
                    else:
                        self.failed += 1
                except httpx.HTTPError:
                    self.failed += 1
                    time.sleep(0.5)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=90)


def replicas(kubectl: Kubectl) -> int:
    return int(kubectl.run("get", "l4d", NAME, "-n", NAMESPACE, "-o=jsonpath={.spec.replicas}"))


def events(kubectl: Kubectl) -> list[dict[str, Any]]:
    listed = json.loads(
        kubectl.run(
            "get",
            "events",
            "-n",
            NAMESPACE,
            f"--field-selector=involvedObject.name={NAME}",
            "-o=json",
        )
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


def dashboard_queries() -> list[str]:
    """Every query of the generated dashboards, with the Grafana variables a user would pick for
    this deployment: its resource name, which differs from the served model name."""
    variables = {
        "$__rate_interval": "1m",
        "$namespace": NAMESPACE,
        "$deployment": NAME,
        "$gpu_hour_price": "2.5",
    }
    found = []
    for board in dashboards.all_dashboards(Selectors()):
        for panel in board.to_json()["panels"]:
            for target in panel["targets"]:
                expr: str = target["expr"]
                for variable, value in variables.items():
                    expr = expr.replace(variable, value)
                found.append(expr)
    return found


def pinned_at_max_expr() -> str:
    (alert,) = (a for a in rules.alerts(Selectors()) if a["alert"] == "Llama4AutoscalerPinnedAtMax")
    return str(alert["expr"])


def series(api: PrometheusApi, expr: str) -> dict[str, float]:
    """reason (or '') -> value of an instant query."""
    return {r["metric"].get("reason", ""): float(r["value"][1]) for r in api.query(expr)}


def external_ray_operator(
    local_cluster: LocalCluster, ray_serve: RayServe, tmp_path: Path
) -> OperatorProcess:
    """An operator (not started) deploying to the test's Ray cluster, deciding every 2 s."""
    return OperatorProcess(
        local_cluster.kubeconfig,
        tmp_path,
        extra_args=(
            f"--external-ray-dashboard={ray_serve.dashboard}",
            f"--external-ray-serve-port={urlsplit(ray_serve.serve_url).port}",
            "--ray-accelerator-resource=fake_gpu",
            "--autoscale-interval=2",
        ),
    )


def test_token_load_scales_up_then_back_down(
    local_cluster: LocalCluster,
    kubectl: Kubectl,
    operator: OperatorProcess,
    ray_serve: RayServe,
    tmp_path: Path,
) -> None:
    tokenizer = tmp_path / "tokenizer"
    write_tokenizer(tokenizer, 512)
    # The session's operator (RayService mode) would act on this resource too: pause it.
    operator.stop()
    autoscaling_operator = external_ray_operator(local_cluster, ray_serve, tmp_path)
    targets_url = f"{ray_serve.serve_url}{PREFIX}/-/metrics/targets"
    with prometheus(
        tmp_path,
        # The job name the chart's ServiceMonitor gives the operator, which the rules select.
        {"llama4-operator": (f"127.0.0.1:{autoscaling_operator.metrics_port}", {})},
        discovered={"serving": targets_url},
    ) as prom:
        autoscaling_operator.extra_args += (f"--prometheus-url={prom.url}",)
        autoscaling_operator.start()
        try:
            kubectl.run("create", "namespace", NAMESPACE, check=False)
            kubectl.run("apply", "-f", "-", input=yaml.safe_dump(deployment(tokenizer)))
            wait_for(lambda: llm_replicas(ray_serve) == 1, 300, "1 LLMServer replica RUNNING")
            targets = httpx.get(targets_url, timeout=10).json()
            assert len(targets) == 1, targets
            assert len(targets[0]["targets"]) == 1, targets
            assert targets[0]["labels"] == {
                "llama4_app": APP,
                "namespace": NAMESPACE,
                "llama4_deployment": NAME,
            }

            started = time.monotonic()
            with Load(f"{ray_serve.serve_url}{PREFIX}/v1/completions") as load:
                wait_for(lambda: replicas(kubectl) == 2, 180, "spec.replicas to go 1 -> 2")
                print(f"scaled up {time.monotonic() - started:.0f} s after the load began")
                wait_for(lambda: llm_replicas(ray_serve) == 2, 240, "2 LLMServer replicas")
                # Prometheus finds the new replica through the ingress and scrapes it.
                wait_for(
                    lambda: (
                        len(prom.query(f'llama4_prompt_tokens_total{{namespace="{NAMESPACE}"}}'))
                        == 2
                    ),
                    60,
                    "Prometheus to scrape both replicas",
                )
                # At its maximum the autoscaler is pinned: that alert's expression fires.
                pinned = wait_for(
                    lambda: prom.query(pinned_at_max_expr()), 30, "the pinned-at-max expression"
                )
                assert [p["metric"]["name"] for p in pinned] == [NAME]
                # Under load, with both replicas and the operator scraped, every dashboard
                # query (serving and operator side, the MoE heatmap included) returns data.
                for expr in dashboard_queries():
                    result = wait_for(lambda e=expr: prom.query(e), 30, f"data for {expr}")
                    assert any(math.isfinite(float(r["value"][1])) for r in result), expr
            assert load.answered > 0, f"no request was answered ({load.failed} failed)"

            stopped = time.monotonic()
            wait_for(lambda: replicas(kubectl) == 1, 180, "spec.replicas to go back 2 -> 1")
            print(f"scaled down {time.monotonic() - stopped:.0f} s after the load stopped")
            wait_for(lambda: llm_replicas(ray_serve) == 1, 180, "1 LLMServer replica again")
            wait_for(
                lambda: len(httpx.get(targets_url, timeout=10).json()[0]["targets"]) == 1,
                60,
                "the ingress to drop the removed replica from its targets",
            )

            status = yaml.safe_load(kubectl.run("get", "l4d", NAME, "-n", NAMESPACE, "-o=yaml"))[
                "status"
            ]["autoscaling"]
            assert status["managesReplicas"] is True
            assert status["desiredReplicas"] == 1
            assert status["metricsSource"] == f"prometheus {prom.url}"
            assert status["lastScaleTime"]

            found = events(kubectl)
            reasons = [e["reason"] for e in found]
            assert "ScaledUp" in reasons, reasons
            assert "ScaledDown" in reasons, reasons
            messages = " | ".join(e["message"] for e in found)
            assert "1 -> 2 replicas" in messages, messages
            assert "2 -> 1 replicas" in messages, messages

            selector = f'namespace="{NAMESPACE}",name="{NAME}"'
            # Wait one scrape so the last decision is in Prometheus.
            wait_for(
                lambda: (
                    series(prom, f"llama4_autoscaler_desired_replicas{{{selector}}}") == {"": 1.0}
                ),
                30,
                "the desired-replicas gauge back at 1 in Prometheus",
            )
            peak = series(
                prom, f"max_over_time(llama4_autoscaler_desired_replicas{{{selector}}}[15m])"
            )
            assert peak == {"": 2.0}
            assert series(prom, f"llama4_autoscaler_max_replicas{{{selector}}}") == {"": 2.0}
            decisions = series(prom, f"llama4_autoscaler_decisions_total{{{selector}}}")
            up = {"scale_up_burst", "scale_up_trend", "clamp_max"}
            down = {"scale_down_lull", "clamp_min"}
            assert up & decisions.keys(), decisions
            assert down & decisions.keys(), decisions
        finally:
            kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true", check=False)
            autoscaling_operator.stop()
            print(autoscaling_operator.log()[-4000:])
            operator.start()


def condition(kubectl: Kubectl, type_: str) -> dict[str, Any]:
    status = yaml.safe_load(kubectl.run("get", "l4d", NAME, "-n", NAMESPACE, "-o=yaml"))["status"]
    found: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c["type"] == type_), {}
    )
    return found


def asleep_in_serve(ray: RayServe) -> bool:
    """The application RUNNING with its engine deployment at no replica, in any state (a
    stopping replica still answers what it is sent; while the application deploys, the details
    list no deployment)."""
    app = ray.application(APP)
    deployments = app.get("deployments") or {}
    return (
        app.get("status") == "RUNNING"
        and any(is_engine_deployment(name) for name in deployments)
        and not ray.engine_replica_ids(APP, state=None)
    )


def test_an_idle_deployment_sleeps_at_zero_and_a_request_wakes_it(
    local_cluster: LocalCluster,
    kubectl: Kubectl,
    operator: OperatorProcess,
    ray_serve: RayServe,
    tmp_path: Path,
) -> None:
    tokenizer = tmp_path / "tokenizer"
    write_tokenizer(tokenizer, 512)
    operator.stop()
    autoscaling_operator = external_ray_operator(local_cluster, ray_serve, tmp_path)
    autoscaling_operator.start()
    try:
        kubectl.run("create", "namespace", NAMESPACE, check=False)
        sleepy = deployment(tokenizer, minReplicas=0, maxReplicas=1, coldStartSeconds=30)
        kubectl.run("apply", "-f", "-", input=yaml.safe_dump(sleepy))
        wait_for(lambda: llm_replicas(ray_serve) == 1, 300, "1 LLMServer replica RUNNING")
        wait_for(lambda: replicas(kubectl) == 0, 180, "spec.replicas to go 1 -> 0 when idle", 2.0)
        wait_for(lambda: asleep_in_serve(ray_serve), 240, "Serve to run no LLMServer replica", 1.0)
        ready = wait_for(
            lambda: (c := condition(kubectl, "Ready")).get("reason") == "ScaledToZero" and c,
            60,
            "Ready=True ScaledToZero",
            2.0,
        )
        assert ready["status"] == "True"

        queue_url = f"{ray_serve.serve_url}{PREFIX}/-/queue"
        assert httpx.get(queue_url, timeout=10).json() == {"waiting_requests": 0}
        answers: list[tuple[httpx.Response, float]] = []

        def ask() -> None:
            started = time.monotonic()
            response = httpx.post(
                f"{ray_serve.serve_url}{PREFIX}/v1/completions",
                json={"model": MODEL, "prompt": "Wake up and route the tokens", "max_tokens": 8},
                timeout=300,
            )
            answers.append((response, time.monotonic() - started))

        caller = threading.Thread(target=ask)
        caller.start()
        # Held by the ingress, which counts it, while no replica runs.
        wait_for(
            lambda: httpx.get(queue_url, timeout=10).json()["waiting_requests"] == 1,
            30,
            "the ingress to count the waiting request",
        )
        caller.join(timeout=300)
        ((response, answered_s),) = answers
        print(f"scale from zero: the first answer came {answered_s:.1f} s after the request")
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
        assert httpx.get(queue_url, timeout=10).json() == {"waiting_requests": 0}
        wait_for(lambda: replicas(kubectl) == 1, 30, "spec.replicas to go 0 -> 1", 2.0)
        woke = [e["message"] for e in events(kubectl) if e["reason"] == "ScaledUp"]
        assert any("0 -> 1 replicas (scale_from_zero)" in m for m in woke), woke
        assert wait_for(
            lambda: condition(kubectl, "Ready").get("reason") == "ServeApplicationRunning",
            60,
            "Ready as a running application again",
            2.0,
        )
    finally:
        print(kubectl.run("get", "l4d", NAME, "-n", NAMESPACE, "-o=yaml", check=False))
        print(json.dumps(ray_serve.application(APP), indent=1)[-3000:])
        kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true", check=False)
        autoscaling_operator.stop()
        print(autoscaling_operator.log()[-4000:])
        operator.start()
