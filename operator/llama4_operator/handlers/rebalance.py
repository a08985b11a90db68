"""The expert rebalance loop: re-plan a deployment's experts from the tokens its replicas
measurably routed to each expert, when the plan's balance on them falls below the threshold.

A Kopf timer calls `Rebalancer.check` every tick; each deployment is checked once per
`spec.placement.rebalance.intervalSeconds`. A check reads the serving replicas' counters (outside
the planning lock: it waits on HTTP), takes the routed tokens since the previous reading
(`planners.expert_load`) and, under the planning lock, asks `decide_rebalance` for a plan within
the migration budget. A new plan goes into the placement ConfigMap (version + 1) and the normal
reconciliation renders it into `LLMServer`'s `user_config`, which the replicas apply between
engine steps. Each decision lands in status; a rebalance also in an event and a metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from llama4_operator import metrics
from llama4_operator.api.catalog import architecture_of
from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.reconcile import (
    Reconciler,
    previous_status,
    read_expert_placement,
)
from llama4_operator.kube import KubeApi
from llama4_operator.planners.expert_load import (
    decide_on_window,
    moe_layer_indices,
    routed_load,
    too_few_tokens,
)
from llama4_operator.planners.expert_placement import RebalanceDecision
from llama4_operator.planners.placement_metrics import Topology
from llama4_operator.renderers.children import Owner, render_expert_placement
from llama4_operator.serving_metrics import (
    DeploymentTarget,
    MetricsUnavailable,
    ServingMetricsSource,
    ServingSnapshot,
    source_for,
)
from llama4_serving.config import ExpertPlacement

Body = Mapping[str, Any]
Logger = logging.Logger | logging.LoggerAdapter[Any]
REASON = "ExpertsRebalanced"
# Timer ticks come a little early or late; a check due within this much is run now.
TICK_SLACK_S = 1.0


@dataclass
class _Window:
    """One deployment's measuring window: the reading it starts from, when it was last due."""

    start: ServingSnapshot | None = None
    checked_at: float | None = None


@dataclass
class Rebalancer:
    """Per-deployment windows in memory (a restarted operator starts new ones)."""

    kube: KubeApi
    reconciler: Reconciler
    source: ServingMetricsSource
    lock: asyncio.Lock
    clock: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)

    @classmethod
    def for_config(
        cls, reconciler: Reconciler, config: OperatorConfig, lock: asyncio.Lock
    ) -> Rebalancer:
        """Read routed tokens from Prometheus when the operator has its URL, else from the
        replicas; re-plan under `lock`, the lock reconciliations take."""
        return cls(reconciler.kube, reconciler, source_for(config.prometheus_url), lock)

    def forget(self, namespace: str, name: str) -> None:
        self._windows.pop((namespace, name), None)

    async def check(self, body: Body, logger: Logger) -> RebalanceDecision | None:
        """Measure and, when due and needed, rebalance; the decision taken, if one was."""
        meta = body["metadata"]
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        try:
            spec = Llama4DeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None  # the reconciliation reports it
        settings = spec.placement.rebalance
        # vLLM takes no external plan and balances its experts itself (EPLB).
        if not settings.enabled or spec.engine.name != "reference":
            self.forget(owner.namespace, owner.name)
            return None
        window = self._windows.setdefault((owner.namespace, owner.name), _Window())
        started = self.clock()
        due = window.checked_at is None or (
            started - window.checked_at >= settings.interval_seconds - TICK_SLACK_S
        )
        if not due:
            return None
        target = DeploymentTarget.of(body, spec.model.served_model_name)
        try:
            reading = await self.source.snapshot(target)
        except MetricsUnavailable as error:
            logger.debug("no rebalance check: serving metrics unavailable: %s", error)
            await self._report(body, owner, f"serving metrics unavailable: {error}")
            return None
        window.checked_at = started
        if window.start is None:
            window.start = reading
            logger.debug("rebalance window starts with %d replicas", len(reading.replicas))
            return None
        async with self.lock:
            return await self._decide(body, owner, spec, window, reading, logger)

    async def _decide(
        self,
        body: Body,
        owner: Owner,
        spec: Llama4DeploymentSpec,
        window: _Window,
        reading: ServingSnapshot,
        logger: Logger,
    ) -> RebalanceDecision | None:
        assert window.start is not None
        current = await read_expert_placement(self.kube, owner)
        arch = architecture_of(spec.model)
        moe_layers = moe_layer_indices(arch)
        if current is None or len(current.phy2log) != len(moe_layers):
            logger.debug("no rebalance check: no expert plan of this model in the ConfigMap yet")
            return None
        topology = Topology(
            nodes=current.nodes,
            gpus_per_node=current.gpus_per_node,
            slots_per_gpu=current.slots_per_gpu,
        )
        load = routed_load(window.start, reading, moe_layers, arch.num_local_experts)
        if shortfall := too_few_tokens(load, topology.gpus):
            # The window stays open: the next reading adds to it.
            logger.debug("no rebalance check yet: %s", shortfall)
            return None
        window.start = reading
        settings = spec.placement.rebalance
        decision = await asyncio.to_thread(
            decide_on_window,
            current.phy2log,
            topology,
            load,
            threshold=settings.balance_threshold,
            max_experts_moved=settings.migration_budget,
            balance_slack=spec.placement.balance_slack,
        )
        if decision.rebalance:
            await self._rebalance(body, owner, current, decision, logger)
        else:
            logger.debug("no rebalance: %s", decision.reason)
            await self._report(body, owner, decision.reason, decision.current_balance)
            metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(decision.current_balance)
        return decision

    async def _rebalance(
        self,
        body: Body,
        owner: Owner,
        current: ExpertPlacement,
        decision: RebalanceDecision,
        logger: Logger,
    ) -> None:
        assert decision.phy2log is not None
        plan = current.model_copy(
            update={"phy2log": decision.phy2log.tolist(), "version": current.version + 1}
        )
        await self.kube.apply(render_expert_placement(owner, plan))
        try:
            # The reconciliation keeps the ConfigMap's plan and renders it into the engine's
            # user_config override; the lock is already held.
            await self.reconciler.reconcile(body, logger)
        except (kopf.TemporaryError, kopf.PermanentError) as error:
            logger.info(
                "the engine takes expert plan %d at the next resync: %s", plan.version, error
            )
        placement = previous_status(body).placement
        done = (placement.rebalances if placement and placement.rebalances else 0) + 1
        await self.kube.patch_status(
            owner.namespace,
            owner.name,
            {
                "placement": {
                    "expertPlanVersion": plan.version,
                    "measuredBalance": round(decision.planned_balance, 4),
                    "rebalanceMessage": decision.reason,
                    "lastRebalanceTime": self.now().isoformat(),
                    "rebalances": done,
                    "lastExpertsMoved": decision.experts_moved,
                }
            },
        )
        self.kube.post_event(
            body,
            "Normal",
            REASON,
            f"expert balance {decision.current_balance:.3f} -> {decision.planned_balance:.3f} "
            f"on the measured load: moved {decision.experts_moved} expert copies "
            f"(plan version {plan.version})",
        )
        metrics.EXPERT_REBALANCES.labels(owner.namespace, owner.name).inc()
        metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(decision.planned_balance)
        logger.info("rebalanced experts: %s", decision.reason)

    async def _report(
        self, body: Body, owner: Owner, message: str, balance: float | None = None
    ) -> None:
        """The verdict in status, patched only when it changed (not once per tick)."""
        placement = previous_status(body).placement
        if placement is None:
            return  # nothing placed yet: there is no plan to talk about
        patch: dict[str, Any] = {}
        if placement.rebalance_message != message:
            patch["rebalanceMessage"] = message
        if balance is not None and placement.measured_balance != round(balance, 4):
            patch["measuredBalance"] = round(balance, 4)
        if patch:
            await self.kube.patch_status(owner.namespace, owner.name, {"placement": patch})
