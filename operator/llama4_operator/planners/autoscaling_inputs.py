"""What the live autoscaler feeds the `token` policy: samples from serving snapshots, the policy
settings from the spec, and the per-deployment memory between decisions. Pure: the handler
reads the snapshots and the clock and passes them in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llama4_operator.api.models import AutoscalingSpec
from llama4_operator.planners.autoscaling import (
    MetricSample,
    ScalingDecision,
    ScalingReason,
    TokenPolicyConfig,
    decide_replicas,
)
from llama4_operator.planners.serving_snapshot import ServingSnapshot, summed_delta

# Tokens/s one replica is first assumed to carry when spec.autoscaling.targetTokensPerSecond is
# omitted. High on purpose: a guess above the truth shows up as a growing backlog, which both
# scales up and calibrates the capacity; a guess below it would add replicas nothing measures.
DEFAULT_CAPACITY_GUESS = 1000.0
# Samples older than the policy's longest window (plus this margin) are dropped.
HISTORY_MARGIN_S = 60.0


def policy_config(spec: AutoscalingSpec, interval_s: float) -> TokenPolicyConfig:
    """The `token` policy's settings for one deployment's spec.autoscaling.

    interval_s: seconds between decisions; a sample older than three of them (at least a
    minute) counts as stale.
    """
    delay = float(spec.scale_down_delay_seconds)
    return TokenPolicyConfig(
        capacity_tokens_per_s=float(spec.target_tokens_per_second or DEFAULT_CAPACITY_GUESS),
        calibrate=spec.target_tokens_per_second is None,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        cold_start_s=float(spec.cold_start_seconds),
        scale_down_window_s=delay,
        scale_down_cooldown_s=delay,
        stale_after_s=max(60.0, 3.0 * interval_s),
    )


def metric_sample(
    prev: ServingSnapshot, cur: ServingSnapshot, current_replicas: int
) -> MetricSample | None:
    """The deployment's rates between two snapshots (None when no time passed between them).

    Rates count instances present in both; the backlog and `ready_replicas` (replicas that
    report) count every instance in `cur`.
    """
    elapsed = cur.time_s - prev.time_s
    if elapsed <= 0:
        return None
    return MetricSample(
        time_s=cur.time_s,
        prompt_tokens_per_s=summed_delta(prev, cur, lambda c: c.prompt_tokens) / elapsed,
        generated_tokens_per_s=summed_delta(prev, cur, lambda c: c.generation_tokens) / elapsed,
        waiting_tokens=sum(c.waiting_prompt_tokens for c in cur.replicas.values()),
        ready_replicas=len(cur.replicas),
        current_replicas=current_replicas,
    )


@dataclass
class AutoscalerState:
    """What one deployment's autoscaler remembers between decisions (in the operator's memory:
    a restart starts afresh, which only delays scale-downs until the history covers the window).
    """

    history: deque[MetricSample] = field(default_factory=deque)
    last_snapshot: ServingSnapshot | None = None
    last_scale_up_s: float | None = None
    last_replicas: int | None = None
    """spec.replicas at the previous decision: in advisory mode a rise is someone's scale-up."""
    announced: tuple[int, str] | None = None
    """(desired replicas, reason class) last posted as an event, so holding posts nothing."""

    def observe(
        self, snapshot: ServingSnapshot, current_replicas: int, keep_s: float
    ) -> MetricSample | None:
        """Add a snapshot; returns the new sample (None for the first snapshot)."""
        previous, self.last_snapshot = self.last_snapshot, snapshot
        if previous is None:
            return None
        sample = metric_sample(previous, snapshot, current_replicas)
        if sample is None:
            return None
        self.history.append(sample)
        while self.history and self.history[0].time_s < snapshot.time_s - keep_s:
            self.history.popleft()
        return sample

    def decide(
        self, config: TokenPolicyConfig, now_s: float, current_replicas: int
    ) -> ScalingDecision:
        return decide_replicas(
            list(self.history), config, now_s, current_replicas, self.last_scale_up_s
        )


def history_span_s(config: TokenPolicyConfig) -> float:
    """Seconds of samples the policy looks at, with a margin."""
    return (
        max(config.effective_scale_down_window_s, config.trend_window_s, config.burst_window_s)
        + HISTORY_MARGIN_S
    )


def reason_class(decision: ScalingDecision, current_replicas: int) -> str:
    """Coarse kind of a decision, for events: scale_up, scale_down, or the kind of hold."""
    if decision.desired_replicas > current_replicas:
        return "scale_up"
    if decision.desired_replicas < current_replicas:
        return "scale_down"
    if decision.reason in (ScalingReason.HOLD_METRICS_STALE, ScalingReason.HOLD_COOLDOWN):
        return str(decision.reason)
    return "hold"


def stale_decision(current_replicas: int, config: TokenPolicyConfig, why: str) -> ScalingDecision:
    """Hold when no reading could be had; `why` names what failed."""
    held = min(max(current_replicas, config.min_replicas), config.max_replicas)
    if held == current_replicas:
        reason = ScalingReason.HOLD_METRICS_STALE
        message = f"holding {held}: no serving metrics: {why}"
    else:
        # Out of bounds (min/max just changed): bounds need no metrics.
        reason = ScalingReason.CLAMP_MIN if held > current_replicas else ScalingReason.CLAMP_MAX
        message = f"{current_replicas} is outside [{config.min_replicas}, {config.max_replicas}]"
    return ScalingDecision(held, reason, 0.0, config.capacity_tokens_per_s, message)


def wake_decision(waiting_requests: int, config: TokenPolicyConfig) -> ScalingDecision:
    """At zero replicas with requests waiting at the ingress: start replicas (minReplicas, at
    least one); the policy sizes the deployment from their metrics once they serve."""
    wake = max(config.min_replicas, 1)
    return ScalingDecision(
        wake,
        ScalingReason.SCALE_FROM_ZERO,
        0.0,
        config.capacity_tokens_per_s,
        f"{waiting_requests} request(s) wait at the ingress with no replica up: starting {wake}",
    )


def asleep_decision(config: TokenPolicyConfig, why: str) -> ScalingDecision:
    """At zero replicas with nothing waiting: stay there (no replica, so no serving metrics)."""
    return ScalingDecision(
        0,
        ScalingReason.HOLD_STABLE,
        0.0,
        config.capacity_tokens_per_s,
        f"scaled to zero: the next request starts a replica ({why})",
    )
