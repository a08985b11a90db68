"""Live autoscaling without a cluster: samples from snapshots, spec -> policy settings, the
serving-metrics sources against fake HTTP servers, and the Autoscaler against a fake source and
a fake kube module (scales up, holds on missing metrics, never to zero, clamps, respects off)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fake_kube import FakeKube, FakeServingSource, typed
from llama4_operator import metrics
from llama4_operator.api.models import AutoscalingSpec
from llama4_operator.handlers.autoscale import OFF_MESSAGE, Autoscaler
from llama4_operator.handlers.config import ConfigError, OperatorConfig
from llama4_operator.planners.autoscaling import ScalingReason
from llama4_operator.planners.autoscaling_inputs import (
    DEFAULT_CAPACITY_GUESS,
    metric_sample,
    policy_config,
)
from llama4_operator.serving_metrics import (
    PROMPT_TOKENS,
    WAITING_PROMPT_TOKENS,
    DeploymentTarget,
    DirectSource,
    MetricsUnavailable,
    PrometheusSource,
    ReplicaCounters,
    ServingSnapshot,
    parse_exposition,
    parse_targets,
    targets_url,
)

LOG = logging.getLogger("test")
NS, NAME, MODEL = "llm", "chat", "tiny-llama4"
TARGET = DeploymentTarget(NS, NAME, MODEL, "http://ray:8000/llm-chat/v1")


def snap(time_s: float, **replicas: tuple[float, float, float]) -> ServingSnapshot:
    """replicas: instance -> (prompt tokens, generated tokens, waiting prompt tokens)."""
    return ServingSnapshot(
        time_s,
        {
            instance.replace("_", ":"): ReplicaCounters(
                prompt_tokens=p, generation_tokens=g, waiting_prompt_tokens=w
            )
            for instance, (p, g, w) in replicas.items()
        },
    )


# -- samples and settings ------------------------------------------------------------------


def test_sample_rates_come_from_counter_deltas_of_instances_seen_twice() -> None:
    prev = snap(100.0, a_1=(1000, 500, 0), b_1=(50, 10, 0))
    # b restarted (counters reset below their old values); c is new; both report a backlog.
    cur = snap(110.0, a_1=(1500, 700, 0), b_1=(30, 5, 40), c_1=(9999, 9999, 60))
    sample = metric_sample(prev, cur, current_replicas=3)
    assert sample is not None
    assert sample.prompt_tokens_per_s == pytest.approx((500 + 30) / 10)
    assert sample.generated_tokens_per_s == pytest.approx((200 + 5) / 10)
    assert sample.waiting_tokens == 100  # every instance in the newer snapshot
    assert sample.ready_replicas == 3
    assert sample.current_replicas == 3
    assert metric_sample(cur, cur, current_replicas=3) is None  # no time passed


def test_policy_settings_follow_the_spec() -> None:
    spec = AutoscalingSpec(
        enabled=True,
        min_replicas=0,
        max_replicas=3,
        target_tokens_per_second=40,
        scale_down_delay_seconds=20,
        cold_start_seconds=10,
    )
    config = policy_config(spec, interval_s=2)
    assert config.capacity_tokens_per_s == 40
    assert not config.calibrate
    assert config.min_replicas == 0  # the ingress' queue shows demand at zero
    assert config.max_replicas == 3
    assert config.scale_down_window_s == config.scale_down_cooldown_s == 20
    assert config.cold_start_s == 10
    assert config.stale_after_s == 60
    auto = policy_config(AutoscalingSpec(enabled=True), interval_s=30)
    assert auto.calibrate
    assert auto.capacity_tokens_per_s == DEFAULT_CAPACITY_GUESS
    assert auto.stale_after_s == 90


def test_operator_settings_name_the_variable_and_the_fix() -> None:
    config = OperatorConfig.from_env(
        {
            "LLAMA4_PROMETHEUS_URL": "http://prom:9090",
            "LLAMA4_AUTOSCALE_INTERVAL_SECONDS": "2",
        }
    )
    assert config.prometheus_url == "http://prom:9090"
    assert config.autoscale_interval_s == 2
    assert OperatorConfig.from_env({}).prometheus_url is None
    assert OperatorConfig.from_env({}).autoscale_interval_s == 15
    with pytest.raises(ConfigError, match="LLAMA4_PROMETHEUS_URL must be an http"):
        OperatorConfig.from_env({"LLAMA4_PROMETHEUS_URL": "prom:9090"})
    with pytest.raises(ConfigError, match="LLAMA4_AUTOSCALE_INTERVAL_SECONDS must be at least"):
        OperatorConfig.from_env({"LLAMA4_AUTOSCALE_INTERVAL_SECONDS": "0.5"})
    assert OperatorConfig.from_env({}).external_ray_serve_port == 8000
    with pytest.raises(ConfigError, match="LLAMA4_EXTERNAL_RAY_SERVE_PORT must be a TCP port"):
        OperatorConfig.from_env({"LLAMA4_EXTERNAL_RAY_SERVE_PORT": "http"})


# -- sources ----------------------------------------------------------------------------------

EXPOSITION = """\
# TYPE llama4_prompt_tokens_total counter
llama4_prompt_tokens_total{model_name="tiny-llama4"} 120.0
llama4_prompt_tokens_total{model_name="other"} 5.0
# TYPE llama4_generation_tokens_total counter
llama4_generation_tokens_total{model_name="tiny-llama4"} 64.0
# TYPE llama4_prompt_tokens_waiting gauge
llama4_prompt_tokens_waiting{model_name="tiny-llama4"} 17.0
# TYPE llama4_requests_running gauge
llama4_requests_running{model_name="tiny-llama4"} 3.0
# TYPE llama4_expert_routed_tokens_total counter
llama4_expert_routed_tokens_total{expert="2",layer="1",model_name="tiny-llama4"} 40.0
"""


def test_exposition_parsing_keeps_the_served_model_only() -> None:
    counters = parse_exposition(EXPOSITION, MODEL)
    assert counters == ReplicaCounters(120.0, 64.0, 17.0, 3.0, {(1, 2): 40.0})
    assert parse_exposition(EXPOSITION, "absent") is None
    # The autoscaler does not read the per-expert series: it skips them.
    assert parse_exposition(EXPOSITION, MODEL, routed=False) == ReplicaCounters(
        120.0, 64.0, 17.0, 3.0, {}
    )


def test_direct_source_lists_targets_then_scrapes_each_and_drops_unreachable_ones() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/llm-chat/-/metrics/targets":
            groups = [{"targets": ["10.0.0.1:9001", "10.0.0.2:9002"], "labels": {}}]
            return httpx.Response(200, json=groups)
        if request.url.host == "10.0.0.1":
            return httpx.Response(200, text=EXPOSITION)
        return httpx.Response(503, text="going away")

    snapshot = asyncio.run(DirectSource(httpx.MockTransport(handler)).snapshot(TARGET))
    assert set(snapshot.replicas) == {"10.0.0.1:9001"}
    assert snapshot.replicas["10.0.0.1:9001"].waiting_prompt_tokens == 17.0
    assert seen[0] == "http://ray:8000/llm-chat/-/metrics/targets"
    assert targets_url("http://h:8000/v1/") == "http://h:8000/-/metrics/targets"


def test_direct_source_errors_say_what_failed() -> None:
    def no_targets(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[])

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="no route")

    with pytest.raises(MetricsUnavailable, match="lists no replicas"):
        asyncio.run(DirectSource(httpx.MockTransport(no_targets)).snapshot(TARGET))
    with pytest.raises(MetricsUnavailable, match=r"replica discovery at http://ray:8000/.*404"):
        asyncio.run(DirectSource(httpx.MockTransport(broken)).snapshot(TARGET))
    with pytest.raises(MetricsUnavailable, match="no endpoint yet"):
        asyncio.run(DirectSource().snapshot(DeploymentTarget(NS, NAME, MODEL, "")))


def test_prometheus_source_selects_the_deployment_and_groups_by_instance() -> None:
    queries: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        queries.append(query)
        if "expert_routed" in query:
            result = [
                {
                    "metric": {"instance": "10.0.0.1:9001", "layer": "3", "expert": "0"},
                    "value": [1.0, "7"],
                }
            ]
        elif "prompt_tokens_total" in query:
            result = [
                {"metric": {"instance": "10.0.0.1:9001"}, "value": [1.0, "100"]},
                {"metric": {"instance": "10.0.0.2:9002"}, "value": [1.0, "50"]},
            ]
        else:
            result = [{"metric": {"instance": "10.0.0.1:9001"}, "value": [1.0, "2"]}]
        return httpx.Response(200, json={"status": "success", "data": {"result": result}})

    source = PrometheusSource("http://prom:9090/", httpx.MockTransport(handler))
    snapshot = asyncio.run(source.snapshot(TARGET))
    assert snapshot.replicas["10.0.0.1:9001"] == ReplicaCounters(100, 2, 2, 2, {(3, 0): 7})
    assert snapshot.replicas["10.0.0.2:9002"].prompt_tokens == 50
    assert all('namespace="llm",llama4_deployment="chat"' in q for q in queries)
    assert all("by (instance" in q for q in queries)
    assert any("expert_routed" in q for q in queries)
    without_routed = source.queries(TARGET, routed=False)
    assert not any("expert_routed" in q for q in without_routed.values())
    assert len(without_routed) == len(source.queries(TARGET)) - 1


def test_prometheus_source_queries_keep_deployments_with_one_model_name_apart(
    tmp_path: Path,
) -> None:
    # Evaluated by Prometheus' own engine (promtool): deployment "chat" and "other" both serve
    # the model "tiny-llama4"; a replica scraped without the deployment label (a user's own
    # scrape configuration) is matched by the model name.
    series = {
        "chat-0": 'llama4_deployment="chat",model_name="tiny-llama4"',
        "other-0": 'llama4_deployment="other",model_name="tiny-llama4"',
        "unlabelled-0": 'model_name="tiny-llama4"',
        "unrelated-0": 'model_name="another-model"',
    }
    values = {"chat-0": 100, "other-0": 50, "unlabelled-0": 7, "unrelated-0": 3}
    query = PrometheusSource("http://prom:9090").queries(TARGET)[PROMPT_TOKENS]
    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'{PROMPT_TOKENS}{{namespace="llm",instance="{instance}",'
                        f"{labels}}}",
                        "values": f"{values[instance]}x2",
                    }
                    for instance, labels in series.items()
                ]
                + [
                    {
                        "series": f'{PROMPT_TOKENS}{{namespace="elsewhere",instance="x-0",'
                        'llama4_deployment="chat",model_name="tiny-llama4"}',
                        "values": "9x2",
                    }
                ],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "1m",
                        "exp_samples": [
                            {"labels": '{instance="chat-0"}', "value": 100},
                            {"labels": '{instance="unlabelled-0"}', "value": 7},
                        ],
                    }
                ],
            }
        ],
    }
    _promtool_case(tmp_path, case, query)


def _promtool_case(tmp_path: Path, case: dict[str, Any], query: str) -> None:
    path = tmp_path / "queries.test.yaml"
    path.write_text(json.dumps(case))
    result = subprocess.run(
        ["/usr/bin/promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, query + "\n" + result.stdout + result.stderr


def test_vllm_queries_read_vllms_series_per_engine_replica(tmp_path: Path) -> None:
    # vLLM's series as Ray's metrics agents export them: per ReplicaId, several replicas behind
    # one agent (instance). "a1" is this deployment's, scraped without namespace or deployment
    # label (a shared Ray cluster); "b2" is labelled by the operator's ServiceMonitor; "c3"
    # serves the same model name for another deployment, "d4" another model.
    target = DeploymentTarget(NS, NAME, MODEL, "", engine="vllm")
    queries = PrometheusSource("http://prom:9090").queries(target)
    series = {
        "a1": f'model_name="{MODEL}"',
        "b2": f'namespace="{NS}",llama4_deployment="{NAME}",model_name="{MODEL}"',
        "c3": f'namespace="{NS}",llama4_deployment="other",model_name="{MODEL}"',
        "d4": 'model_name="another-model"',
    }

    def inputs(metric: str, value: Mapping[str, float]) -> list[dict[str, str]]:
        return [
            {
                "series": f'{metric}{{instance="agent:8080",ReplicaId="{r}",{labels}}}',
                "values": f"{value[r]}x2",
            }
            for r, labels in series.items()
        ]

    def case(query: str, expected: dict[str, float]) -> dict[str, Any]:
        return {
            "rule_files": [],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": inputs("ray_vllm_prompt_tokens_total", tokens)
                    + inputs("ray_vllm_num_requests_waiting", waiting)
                    + inputs("ray_vllm_request_prompt_tokens_sum", prompt_sum)
                    + inputs("ray_vllm_request_prompt_tokens_count", prompt_count),
                    "promql_expr_test": [
                        {
                            "expr": query,
                            "eval_time": "1m",
                            "exp_samples": [
                                {"labels": f'{{ReplicaId="{r}"}}', "value": v}
                                for r, v in expected.items()
                            ],
                        }
                    ],
                }
            ],
        }

    tokens = {"a1": 100, "b2": 40, "c3": 9, "d4": 3}
    waiting = {"a1": 2, "b2": 0, "c3": 5, "d4": 5}
    prompt_sum = {"a1": 300, "b2": 80, "c3": 10, "d4": 10}
    prompt_count = {"a1": 10, "b2": 4, "c3": 1, "d4": 1}
    _promtool_case(
        tmp_path, case(queries[PROMPT_TOKENS], {"a1": 100, "b2": 40}), queries[PROMPT_TOKENS]
    )
    # Backlog: 2 waiting requests x 30 prompt tokens on average.
    waiting_query = queries[WAITING_PROMPT_TOKENS]
    _promtool_case(tmp_path, case(waiting_query, {"a1": 60, "b2": 0}), waiting_query)


def test_prometheus_source_errors_say_what_failed() -> None:
    def empty(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "success", "data": {"result": []}})

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(MetricsUnavailable, match="no llama4_prompt_tokens_total series"):
        asyncio.run(
            PrometheusSource("http://prom:9090", httpx.MockTransport(empty)).snapshot(TARGET)
        )
    with pytest.raises(MetricsUnavailable, match="Prometheus at http://prom:9090: connection"):
        asyncio.run(
            PrometheusSource("http://prom:9090", httpx.MockTransport(refused)).snapshot(TARGET)
        )


# -- the autoscaler ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def deployment(
    replicas: int, status: dict[str, Any] | None = None, **autoscaling: Any
) -> dict[str, Any]:
    settings = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetTokensPerSecond": 100,
        "scaleDownDelaySeconds": 20,
        "coldStartSeconds": 10,
        **autoscaling,
    }
    return {
        "metadata": {"namespace": NS, "name": NAME},
        "spec": {
            "model": {"variant": "scout", "servedModelName": MODEL},
            "replicas": replicas,
            "autoscaling": settings,
        },
        "status": {"endpoint": TARGET.endpoint, **(status or {})},
    }


def make(interval_s: float = 2.0) -> tuple[Autoscaler, FakeServingSource, FakeKube, Clock]:
    source, kube, clock = FakeServingSource(), FakeKube(), Clock()
    metrics.forget_autoscaler(NS, NAME)
    return Autoscaler(kube, source, interval_s, clock), source, kube, clock


def exported(metric: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def tick(autoscaler: Autoscaler, obj: dict[str, Any]) -> None:
    asyncio.run(autoscaler.tick(typed(obj), LOG))


def test_load_above_capacity_scales_up_and_records_the_decision() -> None:
    autoscaler, source, kube, clock = make()
    # 1 replica of 100 tokens/s; 300 tokens/s arrive: two snapshots 2 s apart give one sample.
    source.script = [snap(clock.now, a_1=(0, 0, 0)), snap(clock.now + 2, a_1=(400, 200, 0))]
    tick(autoscaler, deployment(1))
    assert kube.scales == []
    assert kube.events == []  # the first reading only starts the history
    clock.now += 2
    tick(autoscaler, deployment(1))
    assert kube.scales == [3]  # 300 tokens/s at 80% of 100 each: 4, capped at max 3
    assert source.routed == {False}  # the autoscaler never asks for the per-expert series
    report = kube.statuses[-1]["autoscaling"]
    assert report["managesReplicas"] is True
    assert report["mode"] == "apply"
    assert report["desiredReplicas"] == 3
    assert report["reason"] == ScalingReason.CLAMP_MAX
    assert report["tokensPerSecond"] == pytest.approx(300)
    assert report["lastScaleTime"] == report["lastDecisionTime"]
    assert kube.statuses[-1]["tokensPerSecond"] == pytest.approx(300)
    ((type_, reason, message),) = kube.events
    assert (type_, reason) == ("Normal", "ScaledUp")
    assert "1 -> 3 replicas" in message
    assert exported("llama4_autoscaler_desired_replicas", namespace=NS, name=NAME) == 3
    assert exported("llama4_autoscaler_max_replicas", namespace=NS, name=NAME) == 3
    assert exported("llama4_autoscaler_current_replicas", namespace=NS, name=NAME) == 1
    assert exported("llama4_autoscaler_advisory", namespace=NS, name=NAME) == 0
    assert (
        exported("llama4_autoscaler_decisions_total", namespace=NS, name=NAME, reason="clamp_max")
        == 1
    )


def test_advisory_mode_records_the_advice_and_changes_nothing() -> None:
    autoscaler, source, kube, clock = make()
    # The same load that scales 1 -> 3 in apply mode.
    source.script = [snap(clock.now + 2 * i, a_1=(400.0 * i, 200.0 * i, 0)) for i in range(4)]
    for _ in range(4):
        tick(autoscaler, deployment(1, mode="advisory"))
        clock.now += 2
    assert kube.scales == []  # spec.replicas is never written
    report = kube.statuses[-1]["autoscaling"]
    assert report["managesReplicas"] is False
    assert report["mode"] == "advisory"
    assert report["desiredReplicas"] == 3
    assert report["reason"] == ScalingReason.CLAMP_MAX
    assert report["lastScaleTime"] is None
    # One event for the advice, not one per tick while it stands.
    ((type_, reason, message),) = kube.events
    assert (type_, reason) == ("Normal", "AutoscalerAdvisesScaleUp")
    assert "would scale 1 -> 3" in message
    assert exported("llama4_autoscaler_desired_replicas", namespace=NS, name=NAME) == 3
    assert exported("llama4_autoscaler_current_replicas", namespace=NS, name=NAME) == 1
    assert exported("llama4_autoscaler_advisory", namespace=NS, name=NAME) == 1


def test_advice_honours_the_cooldown_after_someone_else_scales_up() -> None:
    autoscaler, source, kube, clock = make()
    source.script = [snap(clock.now + 2 * i, a_1=(0, 0, 0)) for i in range(30)]
    reasons = []
    for i in range(30):
        # Idle throughout; someone scales 1 -> 2 by hand 30 s in.
        tick(autoscaler, deployment(1 if i < 15 else 2, mode="advisory"))
        reasons.append(kube.statuses[-1]["autoscaling"]["reason"])
        clock.now += 2
    assert kube.scales == []
    # For the 20 s scale-down delay after the hand-made scale-up, no scale-down is advised.
    assert reasons[14] == "clamp_min"  # idle at 1: nothing to give back
    assert reasons[15:26] == ["hold_cooldown"] * 11
    assert kube.statuses[-1]["autoscaling"]["desiredReplicas"] == 1  # then: back to 1


def test_switching_advisory_to_apply_acts_on_the_advice() -> None:
    autoscaler, source, kube, clock = make()
    source.script = [snap(clock.now + 2 * i, a_1=(400.0 * i, 200.0 * i, 0)) for i in range(3)]
    for mode in ("advisory", "advisory", "apply"):
        tick(autoscaler, deployment(1, mode=mode))
        clock.now += 2
    assert kube.scales == [3]
    assert kube.statuses[-1]["autoscaling"]["managesReplicas"] is True
    assert kube.statuses[-1]["autoscaling"]["mode"] == "apply"
    assert [e[1] for e in kube.events] == ["AutoscalerAdvisesScaleUp", "ScaledUp"]
    assert exported("llama4_autoscaler_advisory", namespace=NS, name=NAME) == 0


def test_missing_metrics_hold_with_the_reason_and_warn_once() -> None:
    autoscaler, source, kube, clock = make()
    source.script = [MetricsUnavailable("Prometheus at http://prom: connection refused")] * 3
    for _ in range(3):
        tick(autoscaler, deployment(2))
        clock.now += 2
    assert kube.scales == []
    report = kube.statuses[-1]["autoscaling"]
    assert report["reason"] == "hold_metrics_stale"
    assert report["desiredReplicas"] == 2
    assert "connection refused" in report["message"]
    assert report["tokensPerSecond"] is None
    assert "tokensPerSecond" not in kube.statuses[-1]  # no measurement: the old figure stays
    assert [e[:2] for e in kube.events] == [("Warning", "AutoscalerMetricsUnavailable")]


def test_with_min_replicas_0_an_idle_deployment_goes_to_zero_and_stays_there_quietly() -> None:
    autoscaler, source, kube, clock = make()
    source.script = [snap(clock.now + 2 * i, a_1=(0, 0, 0), b_1=(0, 0, 0)) for i in range(20)]
    replicas = 2
    for _ in range(20):
        tick(autoscaler, deployment(replicas, minReplicas=0))
        replicas = kube.scales[-1] if kube.scales else replicas
        clock.now += 2
    # Idle past the scale-down delay: every replica given back, and replicas that Serve keeps
    # a little longer, idle, do not bring the deployment back.
    assert kube.scales == [0]
    assert ("Normal", "ScaledDown") in [e[:2] for e in kube.events]
    # At zero no replica lists metrics and nothing waits: it stays, with no warning.
    source.script = [MetricsUnavailable("replica discovery lists no replicas")] * 3
    events, queue_reads = len(kube.events), source.queue_reads
    for _ in range(3):
        tick(autoscaler, deployment(0, minReplicas=0))
        clock.now += 2
    assert kube.scales == [0]
    assert source.queue_reads == queue_reads + 3
    report = kube.statuses[-1]["autoscaling"]
    assert (report["desiredReplicas"], report["reason"]) == (0, "hold_stable")
    assert "scaled to zero" in report["message"]
    assert all(e[0] == "Normal" for e in kube.events[events:])


def test_requests_waiting_at_zero_start_a_replica() -> None:
    autoscaler, source, kube, clock = make()
    source.waiting = [0, 3]
    source.script = [MetricsUnavailable("replica discovery lists no replicas")]
    tick(autoscaler, deployment(0, minReplicas=0))
    clock.now += 2
    tick(autoscaler, deployment(0, minReplicas=0))
    assert kube.scales == [1]
    assert source.reads == 1  # with requests waiting, no replica is there to read
    report = kube.statuses[-1]["autoscaling"]
    assert (report["desiredReplicas"], report["reason"]) == (1, "scale_from_zero")
    assert "3 request(s) wait at the ingress" in report["message"]
    assert report["lastScaleTime"] == report["lastDecisionTime"]
    assert kube.events[-1][:2] == ("Normal", "ScaledUp")
    assert "0 -> 1 replicas (scale_from_zero)" in kube.events[-1][2]
    assert (
        exported(
            "llama4_autoscaler_decisions_total", namespace=NS, name=NAME, reason="scale_from_zero"
        )
        == 1
    )
    # Woken, the deployment is not put back to sleep before the scale-down delay has passed.
    source.script = [snap(clock.now + 2 * i, a_1=(0, 0, 0)) for i in range(1, 6)]
    for _ in range(5):
        clock.now += 2
        tick(autoscaler, deployment(1, minReplicas=0))
    assert kube.scales == [1]


def test_an_unreadable_queue_at_zero_says_why_and_holds() -> None:
    autoscaler, source, kube, _ = make()
    source.waiting = [MetricsUnavailable("waiting requests at http://ray:8000/-/queue: refused")]
    source.script = [MetricsUnavailable("replica discovery lists no replicas")]
    tick(autoscaler, deployment(0, minReplicas=0))
    assert kube.scales == []
    assert "refused" in kube.statuses[-1]["autoscaling"]["message"]


def test_the_queue_is_read_from_the_ingress_of_the_endpoint() -> None:
    seen: list[str] = []

    def ingress(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"waiting_requests": 2})

    assert asyncio.run(DirectSource(httpx.MockTransport(ingress)).waiting_requests(TARGET)) == 2
    prometheus = PrometheusSource("http://prom:9090", httpx.MockTransport(ingress))
    assert asyncio.run(prometheus.waiting_requests(TARGET)) == 2
    assert seen == ["http://ray:8000/llm-chat/-/queue"] * 2

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="no route")

    with pytest.raises(MetricsUnavailable, match=r"waiting requests at .*/-/queue.*404"):
        asyncio.run(DirectSource(httpx.MockTransport(broken)).waiting_requests(TARGET))


def test_replicas_outside_the_bounds_are_clamped_even_without_metrics() -> None:
    autoscaler, source, kube, _ = make()
    source.script = [MetricsUnavailable("down")]
    tick(autoscaler, deployment(5, maxReplicas=2))
    assert kube.scales == [2]
    assert kube.statuses[-1]["autoscaling"]["reason"] == "clamp_max"


def test_autoscaling_off_leaves_replicas_alone_and_says_so_once() -> None:
    autoscaler, source, kube, _ = make()
    owned = {"autoscaling": {"managesReplicas": True, "desiredReplicas": 2}}
    tick(autoscaler, deployment(4, status=owned, enabled=False))
    tick(autoscaler, deployment(4, enabled=False))
    assert source.reads == 0
    assert kube.scales == []
    (status,) = kube.statuses
    assert status["autoscaling"]["managesReplicas"] is False
    assert status["autoscaling"]["message"] == OFF_MESSAGE
    assert status["autoscaling"]["desiredReplicas"] is None


def test_turning_off_an_advisory_autoscaler_clears_its_advice() -> None:
    autoscaler, source, kube, _ = make()
    advised = {"autoscaling": {"managesReplicas": False, "mode": "advisory", "desiredReplicas": 3}}
    tick(autoscaler, deployment(1, status=advised, enabled=False, mode="advisory"))
    assert source.reads == 0
    assert kube.scales == []
    (status,) = kube.statuses
    assert status["autoscaling"]["mode"] is None
    assert status["autoscaling"]["desiredReplicas"] is None
    assert status["autoscaling"]["message"] == OFF_MESSAGE


def test_sd_document_is_the_format_prometheus_reads() -> None:
    # The ingress answers with a JSON list of target groups; the operator reads it back.
    document = json.loads('[{"targets": ["10.0.0.1:9001"], "labels": {"namespace": "llm"}}]')
    assert parse_targets(document) == ["10.0.0.1:9001"]
    with pytest.raises(TypeError):
        parse_targets({"targets": []})


def test_the_direct_source_says_vllm_needs_prometheus() -> None:
    target = DeploymentTarget(NS, NAME, MODEL, "http://ray:8000/llm-chat/v1", engine="vllm")
    with pytest.raises(MetricsUnavailable, match="--prometheus-url"):
        asyncio.run(DirectSource().snapshot(target))
