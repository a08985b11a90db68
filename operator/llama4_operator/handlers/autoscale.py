"""Live autoscaling: on each tick, read the deployment's serving metrics, let the `token` policy
decide, and set spec.replicas through the /scale subresource.

The reconcile handlers do the rest (spec.replicas becomes the Serve application's replicas and
the GPU worker groups), so this module never renders anything. It runs outside the reconcile
lock: reading metrics waits on HTTP, and a scale is an ordinary spec change. Each decision goes
to status.autoscaling and the `llama4_autoscaler_*` metrics; an event is posted only when the
desired replicas or the kind of decision changes, so holding steady is quiet.

In advisory mode (spec.autoscaling.mode: advisory) the same decision is made from the replicas
that run and recorded the same way, as advice, and spec.replicas is never written.

With minReplicas 0 the policy takes an idle deployment to zero. No replica then exports
metrics, so at zero the autoscaler asks the ingress how many requests wait for an answer
(`GET /-/queue`) and starts a replica when any do; they are answered once it serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from llama4_operator import metrics
from llama4_operator.api.models import AutoscalerReport, AutoscalingStatus
from llama4_operator.handlers.config import OperatorConfig
from llama4_operator.handlers.resource import Llama4Deployment
from llama4_operator.kube import KubeApi
from llama4_operator.planners.autoscaling import (
    MetricSample,
    ScalingDecision,
    ScalingReason,
    TokenPolicyConfig,
)
from llama4_operator.planners.autoscaling_inputs import (
    AutoscalerState,
    asleep_decision,
    history_span_s,
    policy_config,
    reason_class,
    stale_decision,
    wake_decision,
)
from llama4_operator.renderers.children import Owner
from llama4_operator.serving_metrics import (
    DeploymentTarget,
    MetricsUnavailable,
    ServingMetricsSource,
    source_for,
)

OFF_MESSAGE = "autoscaling is off: spec.replicas is set by hand (kubectl scale) and kept"
_EVENT_REASONS = {
    "scale_up": ("Normal", "ScaledUp"),
    "scale_down": ("Normal", "ScaledDown"),
    "hold_metrics_stale": ("Warning", "AutoscalerMetricsUnavailable"),
    "hold_cooldown": ("Normal", "AutoscalerCooldown"),
    "hold": ("Normal", "AutoscalerHolding"),
}
_ADVISORY_EVENT_REASONS = {
    "scale_up": ("Normal", "AutoscalerAdvisesScaleUp"),
    "scale_down": ("Normal", "AutoscalerAdvisesScaleDown"),
}


class Autoscaler:
    """Decides replicas for every deployment with spec.autoscaling.enabled; one per operator."""

    def __init__(
        self,
        kube: KubeApi,
        source: ServingMetricsSource,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.source = source
        self.interval_s = interval_s
        self.clock = clock
        self._states: dict[tuple[str, str], AutoscalerState] = {}

    @classmethod
    def for_config(cls, kube: KubeApi, config: OperatorConfig) -> Autoscaler:
        """Read metrics from Prometheus when the operator has its URL, else from the replicas."""
        return cls(kube, source_for(config.prometheus_url), config.autoscale_interval_s)

    def forget(self, namespace: str, name: str) -> None:
        self._states.pop((namespace, name), None)
        metrics.forget_autoscaler(namespace, name)

    async def tick(
        self, resource: Llama4Deployment, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        """One decision for one deployment."""
        namespace, name, spec = resource.owner.namespace, resource.owner.name, resource.spec
        if spec is None:
            return  # the reconcile handler reports a bad spec in status
        previous = resource.status.autoscaling
        if not spec.autoscaling.enabled:
            self.forget(namespace, name)
            if previous is not None and (previous.manages_replicas or previous.mode == "advisory"):
                off = AutoscalingStatus(manages_replicas=False, message=OFF_MESSAGE)
                await self._write(resource.owner, AutoscalerReport(autoscaling=off))
            return
        state = self._states.setdefault((namespace, name), AutoscalerState())
        config = policy_config(spec.autoscaling, self.interval_s)
        current = spec.replicas
        advisory = spec.autoscaling.mode == "advisory"
        decision, sample, read_error, now_s = await self._decide(
            resource.metrics_target(spec), state, config, current=current, advisory=advisory
        )
        desired = decision.desired_replicas
        now = datetime.fromtimestamp(now_s, UTC)
        last_scale = previous.last_scale_time if previous is not None else None
        if advisory and desired != current:
            logger.info(
                "autoscaling %s/%s (advisory) would scale %d -> %d: %s",
                namespace,
                name,
                current,
                desired,
                decision.message,
            )
        elif desired != current:
            await self.kube.scale(namespace, name, desired)
            last_scale = now
            if desired > current:
                state.last_scale_up_s = now_s
            logger.info(
                "autoscaling %s/%s %d -> %d: %s",
                namespace,
                name,
                current,
                desired,
                decision.message,
            )
        report = AutoscalingStatus(
            manages_replicas=not advisory,
            mode=spec.autoscaling.mode,
            desired_replicas=desired,
            reason=str(decision.reason),
            message=decision.message,
            metrics_source=self.source.description,
            tokens_per_second=round(sample.tokens_per_s, 3) if sample else None,
            waiting_tokens=sample.waiting_tokens if sample else None,
            capacity_tokens_per_second=round(decision.capacity_tokens_per_s, 3),
            last_decision_time=now,
            last_scale_time=last_scale,
        )
        await self._write(
            resource.owner,
            AutoscalerReport(autoscaling=report, tokens_per_second=report.tokens_per_second),
        )
        metrics.record_autoscaling(
            namespace,
            name,
            desired_replicas=desired,
            current_replicas=current,
            max_replicas=config.max_replicas,
            reason=str(decision.reason),
            advisory=advisory,
        )
        self._announce(
            resource.owner,
            state,
            decision,
            current,
            # A wake is decided from the ingress' queue, with no sample: it is news all the same.
            warming_up=read_error is None
            and not sample
            and decision.reason is not ScalingReason.SCALE_FROM_ZERO,
            advisory=advisory,
        )

    async def _decide(
        self,
        target: DeploymentTarget,
        state: AutoscalerState,
        config: TokenPolicyConfig,
        *,
        current: int,
        advisory: bool,
    ) -> tuple[ScalingDecision, MetricSample | None, str | None, float]:
        """Read, then decide: (decision, the new sample, why metrics were unreadable, now)."""
        sample: MetricSample | None = None
        read_error: str | None = None
        waiting, queue_error = 0, ""
        asleep = current == 0 and config.min_replicas == 0
        if asleep:
            # Scaled to zero: no replica exports anything; requests wait at the ingress.
            try:
                waiting = await self.source.waiting_requests(target)
            except MetricsUnavailable as error:
                queue_error = str(error)
        if not waiting:
            try:
                snapshot = await self.source.snapshot(target, routed=False)
            except MetricsUnavailable as error:
                read_error = str(error)
        now_s = self.clock()
        if advisory and state.last_replicas is not None and current > state.last_replicas:
            # Someone else scaled up: the cooldown after a scale-up applies to the advice too.
            state.last_scale_up_s = now_s
        state.last_replicas = current
        if waiting:
            decision = wake_decision(waiting, config)
        elif read_error is None:
            sample = state.observe(snapshot, current, history_span_s(config))
            decision = state.decide(config, now_s, current)
        elif asleep:
            decision = asleep_decision(config, queue_error or "no request waits")
        else:
            decision = stale_decision(current, config, read_error)
        return decision, sample, read_error, now_s

    async def _write(self, owner: Owner, report: AutoscalerReport) -> None:
        """The autoscaler's part of the status: its whole block (unset fields as null, which
        clears them), and tokensPerSecond only when this decision measured them."""
        await self.kube.patch_status(owner.namespace, owner.name, report.model_dump(mode="json"))

    def _announce(
        self,
        owner: Owner,
        state: AutoscalerState,
        decision: ScalingDecision,
        current: int,
        *,
        warming_up: bool,
        advisory: bool,
    ) -> None:
        """An event when the desired replicas or the kind of decision changed."""
        kind = reason_class(decision, current)
        # Switching mode announces again: advice and action are different news.
        key = (decision.desired_replicas, f"advisory {kind}" if advisory else kind)
        if warming_up or key == state.announced:
            return
        state.announced = key
        type_, reason = (_ADVISORY_EVENT_REASONS if advisory else {}).get(
            kind, _EVENT_REASONS[kind]
        )
        if advisory and kind in ("scale_up", "scale_down"):
            message = (
                f"advisory: would scale {current} -> {decision.desired_replicas} replicas "
                f"({decision.reason}), spec.replicas left alone: {decision.message}"
            )
        elif kind in ("scale_up", "scale_down"):
            message = (
                f"{current} -> {decision.desired_replicas} replicas ({decision.reason}): "
                f"{decision.message}"
            )
        else:
            message = f"{decision.reason}: {decision.message}"
        self.kube.post_event(owner, type_, reason, message)
