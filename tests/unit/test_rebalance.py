"""The expert rebalance loop against a fake metrics source and a fake of the kube module: it
rebalances under skew within the budget, and leaves the plan alone on uniform load, above the
threshold, without metrics, before its interval and when disabled."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import numpy as np
import pytest
import yaml
from kopf._core.intents.handlers import TimerHandler  # no public name for the type

from fake_kube import FakeKube, FakeServingSource, typed
from llama4_operator import metrics
from llama4_operator.handlers.config import ENV_REBALANCE_TICK, ConfigError, OperatorConfig
from llama4_operator.handlers.rebalance import WINDOW_OPENED, Rebalancer
from llama4_operator.handlers.reconcile import Reconciler
from llama4_operator.planners.cluster_placement import GpuNode
from llama4_operator.planners.expert_placement import RebalanceDecision
from llama4_operator.serving_metrics import (
    MetricsUnavailable,
    ReplicaCounters,
    ServingSnapshot,
)
from llama4_serving.config import ExpertPlacement

ROOT = Path(__file__).resolve().parents[2]
LOG = logging.getLogger("test")
CONFIG = OperatorConfig(image="llama4-serving:test", ray_version="2.60.0")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
MAVERICK_MOE_LAYERS = list(range(1, 48, 2))  # every second of 48 layers
EXPERTS = 128
INSTANCE = "10.0.0.7:8090"


class Clock:
    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


def counters(load: np.ndarray) -> ServingSnapshot:
    """A reading whose counters hold `load` [MoE layer, expert] (model layer indices)."""
    routed = {
        (MAVERICK_MOE_LAYERS[row], expert): float(load[row, expert])
        for row in range(load.shape[0])
        for expert in range(load.shape[1])
    }
    return ServingSnapshot(time_s=0.0, replicas={INSTANCE: ReplicaCounters(routed_tokens=routed)})


def skewed_load(plan: ExpertPlacement) -> np.ndarray:
    """Tokens of one window in which the plan's first two experts on GPU 0 are 20x as busy as
    the others, in every layer (a balance near 0.4)."""
    load = np.full((len(plan.phy2log), EXPERTS), 100.0)
    for row, experts in enumerate(plan.phy2log):
        load[row, experts[:2]] = 2000.0
    return load


class Loop:
    """A reconciled Maverick deployment, its fakes, and the rebalancer under test."""

    def __init__(self, engine: str = "reference", **rebalance: Any) -> None:
        document = yaml.safe_load((ROOT / "manifests/samples/maverick.yaml").read_text())
        # The operator's plans go to the engine that takes them: the reference engine (vLLM
        # balances its experts itself and is left alone).
        document["spec"]["engine"] = {"name": engine}
        document["spec"]["placement"]["rebalance"].update(rebalance)
        document["metadata"].update({"namespace": "llm", "uid": "uid-1", "generation": 1})
        self.body: dict[str, Any] = document
        self.kube = FakeKube(
            [GpuNode("gpu-0", "NVIDIA-H100-80GB-HBM3", 81559, 8)], deployment=self.body
        )
        self.reconciler = Reconciler(self.kube, CONFIG, clock=lambda: NOW)
        self.source = FakeServingSource()
        self.clock = Clock()
        self.rebalancer = Rebalancer(
            self.kube, self.reconciler, self.source, asyncio.Lock(), self.clock, lambda: NOW
        )
        metrics.forget("llm", "maverick")  # each test counts from zero
        asyncio.run(self.reconciler.reconcile(typed(self.body), LOG))
        self.kube.statuses.clear()
        self.kube.events.clear()
        self.interval = float(self.body["spec"]["placement"]["rebalance"]["intervalSeconds"])

    def tick(self, reading: ServingSnapshot | Exception | None = None) -> RebalanceDecision | None:
        """One timer tick one interval after the last; `reading` is what the source returns."""
        if reading is not None:
            self.source.script.append(reading)
        decision = asyncio.run(self.rebalancer.check(typed(self.body), LOG))
        assert self.kube.scales == [], "the rebalance loop never scales"
        self.clock.seconds += self.interval
        return decision

    def plan(self) -> ExpertPlacement:
        """The expert plan in the placement ConfigMap."""
        text = self.kube.objects[("ConfigMap", "llm", "maverick-expert-placement")]["data"]
        return ExpertPlacement.model_validate_json(text["expert-placement.json"])

    def serve_application(self) -> dict[str, Any]:
        """The one Serve application of the RayService's serve config."""
        serve = self.kube.objects[("RayService", "llm", "maverick")]["spec"]["serveConfigV2"]
        (application,) = yaml.safe_load(serve)["applications"]
        return dict(application)

    def measure(self, window: np.ndarray) -> RebalanceDecision | None:
        """Start a window at zero and end it with `window` routed."""
        assert self.tick(counters(np.zeros_like(window))) is None
        return self.tick(counters(window))

    def rebalances(self) -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "llama4_operator_expert_rebalances_total", {"namespace": "llm", "name": "maverick"}
            )
            or 0.0
        )


def test_skewed_load_is_rebalanced_into_the_config_map_engine_config_status_and_event() -> None:
    loop = Loop()
    before = loop.plan()
    args_before = json.dumps(loop.serve_application()["args"])
    decision = loop.measure(skewed_load(before))
    assert decision is not None
    assert decision.rebalance, decision.reason
    assert decision.planned_balance >= decision.current_balance + 0.01
    assert 0 < decision.experts_moved <= 8  # the sample's migration budget
    after = loop.plan()
    assert after.version == before.version + 1
    assert after.phy2log == decision.phy2log.tolist()  # type: ignore[union-attr]
    # The reconciliation rendered it into LLMServer's user_config; args are untouched.
    application = loop.serve_application()
    assert application["deployments"][0]["user_config"]["placement"] == after.model_dump()
    assert json.dumps(application["args"]) == args_before
    placement = loop.body["status"]["placement"]
    assert placement["expertPlanVersion"] == after.version
    assert placement["rebalances"] == 1
    assert placement["lastExpertsMoved"] == decision.experts_moved
    assert placement["measuredBalance"] == round(decision.planned_balance, 4)
    assert datetime.fromisoformat(placement["lastRebalanceTime"]) == NOW
    ((kind, _reason, message),) = [e for e in loop.kube.events if e[1] == "ExpertsRebalanced"]
    assert kind == "Normal"
    assert f"{decision.current_balance:.3f} -> {decision.planned_balance:.3f}" in message
    assert f"moved {decision.experts_moved} expert copies" in message
    assert loop.rebalances() == 1
    balance = metrics.REGISTRY.get_sample_value(
        "llama4_operator_expert_balance_ratio", {"namespace": "llm", "name": "maverick"}
    )
    assert balance == pytest.approx(decision.planned_balance)
    # A resync keeps the measured plan and its measured balance.
    asyncio.run(loop.reconciler.reconcile(typed(loop.body), LOG))
    assert loop.plan() == after
    assert loop.body["status"]["placement"]["measuredBalance"] == placement["measuredBalance"]
    metrics.forget("llm", "maverick")
    assert loop.rebalances() == 0.0


@pytest.mark.parametrize(("budget", "rebalanced"), [(0, False), (2, False), (48, True)])
def test_the_migration_budget_bounds_the_moves(budget: int, rebalanced: bool) -> None:
    # 2 moves over 24 layers cannot gain the 0.01 of balance a rebalance must bring.
    loop = Loop(migrationBudget=budget)
    before = loop.plan()
    decision = loop.measure(skewed_load(before))
    assert decision is not None
    assert decision.rebalance is rebalanced
    assert decision.experts_moved <= budget
    if rebalanced:
        assert loop.body["status"]["placement"]["lastExpertsMoved"] <= budget
    else:
        assert f"within {budget} moves" in decision.reason
        assert loop.plan() == before


def test_balance_above_the_threshold_is_left_alone() -> None:
    loop = Loop(balanceThreshold=0.05)
    before = loop.plan()
    decision = loop.measure(skewed_load(before))
    assert decision is not None
    assert not decision.rebalance
    assert "at or above 0.050" in decision.reason
    assert loop.plan() == before
    assert loop.kube.events == []
    placement = loop.body["status"]["placement"]
    assert placement["rebalanceMessage"] == decision.reason
    assert placement["measuredBalance"] == round(decision.current_balance, 4)


def test_uniform_load_is_no_reason_to_move_experts() -> None:
    loop = Loop()
    before = loop.plan()
    decision = loop.measure(np.full((24, EXPERTS), 500.0))
    assert decision is not None
    assert not decision.rebalance
    assert decision.current_balance > 0.8
    assert loop.plan() == before
    assert loop.rebalances() == 0.0


def test_missing_metrics_change_nothing_and_are_said_once() -> None:
    loop = Loop()
    before = loop.plan()
    for _ in range(3):
        assert loop.tick(MetricsUnavailable("Prometheus at http://prom:9090: timed out")) is None
    assert loop.plan() == before
    assert loop.kube.events == []
    # One status patch with the reason, not one per tick.
    assert loop.kube.statuses == [
        {
            "placement": {
                "rebalanceMessage": "serving metrics unavailable: Prometheus at "
                "http://prom:9090: timed out"
            }
        }
    ]
    (target, *_) = loop.source.targets
    assert target.served_model_name == "maverick"
    assert target.endpoint == loop.body["status"]["endpoint"]


def test_a_reading_after_missing_metrics_replaces_their_message() -> None:
    loop = Loop()
    loop.tick(MetricsUnavailable("Prometheus at http://prom:9090: timed out"))
    assert "serving metrics unavailable" in loop.body["status"]["placement"]["rebalanceMessage"]
    sparse = skewed_load(loop.plan()) / 100.0
    loop.tick(counters(np.zeros_like(sparse)))
    assert loop.body["status"]["placement"]["rebalanceMessage"] == WINDOW_OPENED
    loop.tick(counters(sparse))  # too few tokens to judge: the message says so
    assert "tokens per MoE layer" in loop.body["status"]["placement"]["rebalanceMessage"]


def test_a_rebalance_reconciles_from_the_status_as_it_is_now() -> None:
    loop = Loop()
    window = skewed_load(loop.plan())
    loop.tick(counters(np.zeros_like(window)))
    # The timer's copy was taken before a reconciliation found every replica placed again.
    stale = copy.deepcopy(loop.body)
    for condition in stale["status"]["conditions"]:
        if condition["type"] == "Degraded":
            condition.update(status="True", reason="RayWorkerLost", message="replica 0: lost")
    stale["status"]["placement"]["rebalances"] = 5
    loop.source.script.append(counters(window))
    decision = asyncio.run(loop.rebalancer.check(typed(stale), LOG))
    assert decision is not None
    assert decision.rebalance
    assert [e.reason for e in loop.kube.events] == ["ExpertsRebalanced"]
    assert loop.body["status"]["placement"]["rebalances"] == 1


def test_too_few_tokens_keep_the_window_open() -> None:
    loop = Loop()
    before = loop.plan()
    sparse = skewed_load(before) / 100.0  # far below 200 tokens per GPU and layer
    assert loop.tick(counters(np.zeros_like(sparse))) is None
    assert loop.tick(counters(sparse)) is None
    assert loop.plan() == before
    # The next reading adds to the same window, which is then enough.
    decision = loop.tick(counters(sparse * 101.0))
    assert decision is not None
    assert decision.rebalance


def test_checks_wait_for_the_interval() -> None:
    loop = Loop(intervalSeconds=600)
    loop.tick(counters(np.zeros((24, EXPERTS))))
    loop.clock.seconds -= 300  # the next tick comes half an interval later
    assert loop.tick() is None  # not due: the source is not asked
    assert len(loop.source.targets) == 1


def test_disabled_rebalancing_reads_nothing() -> None:
    loop = Loop(enabled=False)
    before = loop.plan()
    assert loop.tick() is None
    assert loop.tick() is None
    assert loop.source.targets == []
    assert loop.plan() == before


def test_vllm_deployments_are_left_to_vllms_own_balancer() -> None:
    loop = Loop(engine="vllm")
    before = loop.plan()
    assert loop.tick() is None
    assert loop.tick() is None
    assert loop.source.targets == []  # no reading: vLLM exports no per-expert load
    assert loop.plan() == before
    assert loop.kube.statuses == []


def test_the_rebalance_tick_setting_is_checked() -> None:
    assert OperatorConfig.from_env({}).rebalance_tick_s == 30.0
    assert OperatorConfig.from_env({ENV_REBALANCE_TICK: "5"}).rebalance_tick_s == 5.0
    for bad in ("0.5", "soon"):
        with pytest.raises(ConfigError, match=ENV_REBALANCE_TICK):
            OperatorConfig.from_env({ENV_REBALANCE_TICK: bad})


def test_a_kopf_timer_runs_the_rebalancer_every_tick() -> None:
    from llama4_operator.handlers import kopf_handlers

    spawning = kopf.get_default_registry()._spawning
    timers = [
        h
        for h in spawning.get_all_handlers()
        if isinstance(h, TimerHandler) and h.id == "rebalance"
    ]
    assert timers, "no timer named rebalance is registered"
    assert timers[0].interval == kopf_handlers.CONFIG.rebalance_tick_s
    assert timers[0].fn is kopf_handlers.rebalance
