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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from llama4_operator import metrics
from llama4_operator.api.catalog import architecture_of
from llama4_operator.api.models import (
    GROUP,
    KIND,
    VERSION,
    ExpertRebalancing,
    RebalancerReport,
)
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.reconcile import Reconciler, read_expert_placement
from llama4_operator.handlers.resource import Llama4Deployment
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
    MetricsUnavailable,
    ServingMetricsSource,
    ServingSnapshot,
    source_for,
)
from llama4_serving.config import ExpertPlacement

Logger = logging.Logger | logging.LoggerAdapter[Any]
REASON = "ExpertsRebalanced"
# Timer ticks come a little early or late; a check due within this much is run now.
TICK_SLACK_S = 1.0
WINDOW_OPENED = "measuring: the first reading of routed tokens opened the window"
NO_PLAN = "no expert plan of this model in the placement ConfigMap yet"


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

    async def check(self, resource: Llama4Deployment, logger: Logger) -> RebalanceDecision | None:
        """Measure and, when due and needed, rebalance; the decision taken, if one was."""
        owner, spec = resource.owner, resource.spec
        if spec is None:
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
        try:
            reading = await self.source.snapshot(resource.metrics_target(spec))
        except MetricsUnavailable as error:
            logger.debug("no rebalance check: serving metrics unavailable: %s", error)
            await self._report(resource, f"serving metrics unavailable: {error}")
            return None
        window.checked_at = started
        if window.start is None:
            window.start = reading
            logger.debug("rebalance window starts with %d replicas", len(reading.replicas))
            await self._report(resource, WINDOW_OPENED)
            return None
        async with self.lock:
            return await self._decide(owner, window, reading, logger)

    async def _reread(self, owner: Owner) -> Llama4Deployment | None:
        """The deployment as the API server holds it now (None: deleted meanwhile)."""
        body = await self.kube.get(f"{GROUP}/{VERSION}", KIND, owner.namespace, owner.name)
        return Llama4Deployment.from_body(body) if body is not None else None

    async def _decide(
        self, owner: Owner, window: _Window, reading: ServingSnapshot, logger: Logger
    ) -> RebalanceDecision | None:
        assert window.start is not None
        # Read again: the status moved on while the metrics were read and the lock awaited, and
        # the reconciliation a rebalance runs writes from it.
        resource = await self._reread(owner)
        if resource is None or resource.spec is None:
            return None  # deleted meanwhile, or its spec made invalid
        spec = resource.spec
        current = await read_expert_placement(self.kube, resource.owner)
        arch = architecture_of(spec.model)
        moe_layers = moe_layer_indices(arch)
        if current is None or len(current.phy2log) != len(moe_layers):
            logger.debug("no rebalance check: %s", NO_PLAN)
            await self._report(resource, NO_PLAN)
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
            await self._report(resource, shortfall)
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
        owner = resource.owner
        if decision.rebalance:
            await self._rebalance(resource, current, decision, logger)
        else:
            logger.debug("no rebalance: %s", decision.reason)
            measured = ExpertRebalancing(
                rebalance_message=decision.reason,
                measured_balance=round(decision.current_balance, 4),
                measured_plan_version=current.version,
            )
            await self._write_if_changed(resource, measured)
            metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(decision.current_balance)
        return decision

    async def _rebalance(
        self,
        resource: Llama4Deployment,
        current: ExpertPlacement,
        decision: RebalanceDecision,
        logger: Logger,
    ) -> None:
        assert decision.phy2log is not None
        owner = resource.owner
        plan = current.model_copy(
            update={"phy2log": decision.phy2log.tolist(), "version": current.version + 1}
        )
        await self.kube.apply(render_expert_placement(owner, plan))
        try:
            # The reconciliation keeps the ConfigMap's plan and renders it into the engine's
            # user_config override; the lock is already held.
            await self.reconciler.reconcile(resource, logger)
        except (kopf.TemporaryError, kopf.PermanentError) as error:
            logger.info(
                "the engine takes expert plan %d at the next resync: %s", plan.version, error
            )
        placement = resource.status.placement
        done = (placement.rebalances if placement and placement.rebalances else 0) + 1
        await self._write(
            owner,
            ExpertRebalancing(
                measured_balance=round(decision.planned_balance, 4),
                measured_plan_version=plan.version,
                rebalance_message=decision.reason,
                last_rebalance_time=self.now(),
                rebalances=done,
                last_experts_moved=decision.experts_moved,
            ),
        )
        self.kube.post_event(
            owner,
            "Normal",
            REASON,
            f"expert balance {decision.current_balance:.3f} -> {decision.planned_balance:.3f} "
            f"on the measured load: moved {decision.experts_moved} expert copies "
            f"(plan version {plan.version})",
        )
        metrics.EXPERT_REBALANCES.labels(owner.namespace, owner.name).inc()
        metrics.EXPERT_BALANCE.labels(owner.namespace, owner.name).set(decision.planned_balance)
        logger.info("rebalanced experts: %s", decision.reason)

    async def _report(self, resource: Llama4Deployment, message: str) -> None:
        """A verdict without a measurement, in status when it changed (not once per tick)."""
        await self._write_if_changed(resource, ExpertRebalancing(rebalance_message=message))

    async def _write_if_changed(
        self, resource: Llama4Deployment, fields: ExpertRebalancing
    ) -> None:
        """Write the fields set in `fields` unless status already holds them."""
        placement = resource.status.placement
        if placement is None:
            return  # nothing placed yet: there is no plan to talk about
        if any(
            getattr(placement, name) != getattr(fields, name) for name in fields.model_fields_set
        ):
            await self._write(resource.owner, fields)

    async def _write(self, owner: Owner, fields: ExpertRebalancing) -> None:
        """The rebalance loop's part of the status: the fields set in `fields`, and no other."""
        report = RebalancerReport(placement=fields)
        await self.kube.patch_status(
            owner.namespace, owner.name, report.model_dump(mode="json", exclude_unset=True)
        )
