"""Autoscaling policies the simulator replays: the project's `token` policy and the baselines.

Each baseline follows docs/autoscaling.md (from the reference description) with its usual
settings. Every policy sees the same per-second history of serving metrics and answers, when it
is due, with the replicas it wants; the simulator starts or removes replicas to match.

- `hpa`: Kubernetes HPA v2, AverageValue target on an external metric polled by KEDA every 15 s:
  vLLM's waiting requests (target 5) or KV-cache use (target 0.7).
- `keda-tokens`: the same HPA mechanics on prompt plus generated tokens/s (a 1-minute rate),
  target in tokens/s per replica.
- `kpa`: Knative's autoscaler on concurrency with its stable and panic windows.
- `rayserve`: Ray Serve's default request-based autoscaler.
- `oracle`: knows the future per-minute demand and the cold start; the cost lower bound.
- `token`: `llama4_operator.planners.autoscaling.decide_replicas`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from llama4_operator.planners.autoscaling import (
    MetricSample,
    TokenPolicyConfig,
    decide_replicas,
)

FloatArray = npt.NDArray[np.float64]

POLICY_NAMES = ("token", "hpa", "keda-tokens", "kpa", "rayserve", "oracle")


class History:
    """Per-tick serving metrics, appended by the simulator and read by the policies."""

    FIELDS = (
        "time_s",
        "prompt_tokens_per_s",
        "generated_tokens_per_s",
        "waiting_requests",
        "waiting_tokens",
        "running_requests",
        "ongoing_requests",
        "kv_usage",
        "ready_replicas",
        "live_replicas",
    )

    def __init__(self, capacity: int, tick_s: float):
        self.tick_s = tick_s
        self.length = 0
        self._data = np.zeros((len(self.FIELDS), capacity), dtype=np.float64)
        self._index = {name: i for i, name in enumerate(self.FIELDS)}

    def append(self, **values: float) -> None:
        if self.length == self._data.shape[1]:
            self._data = np.concatenate([self._data, np.zeros_like(self._data)], axis=1)
        for name, value in values.items():
            self._data[self._index[name], self.length] = value
        self.length += 1

    def last(self, name: str) -> float:
        return float(self._data[self._index[name], self.length - 1])

    def window(self, name: str, seconds: float) -> FloatArray:
        """The newest `seconds` worth of one field (fewer at the start of a run)."""
        ticks = max(1, round(seconds / self.tick_s))
        row: FloatArray = self._data[self._index[name], max(0, self.length - ticks) : self.length]
        return row

    def column(self, name: str) -> FloatArray:
        row: FloatArray = self._data[self._index[name], : self.length]
        return row


@dataclass(frozen=True)
class ClusterView:
    """What a policy may look at when it is asked."""

    now_s: float
    live_replicas: int
    ready_replicas: int
    history: History


class Policy(Protocol):
    """A policy is asked every tick; it answers None when it is not due or changes nothing."""

    name: str

    def decide(self, view: ClusterView) -> int | None: ...

    def reasons(self) -> dict[str, int]: ...


@dataclass
class _Periodic:
    period_s: float
    _next_s: float = 0.0

    def due(self, now_s: float) -> bool:
        if now_s + 1e-9 < self._next_s:
            return False
        self._next_s = now_s + self.period_s
        return True


@dataclass
class HpaPolicy:
    """HPA v2, AverageValue target on an external metric, as KEDA feeds it.

    Every `sync_period_s`: desired = ceil(metric total / target), unchanged while the usage ratio
    is within `tolerance` of 1; up by at most max(100%, 4 pods) per sync; down only to the
    highest recommendation of the last `stabilization_s`.
    """

    metric: str = "waiting_requests"
    target: float = 5.0
    name: str = "hpa"
    sync_period_s: float = 15.0
    tolerance: float = 0.1
    stabilization_s: float = 300.0
    rate_window_s: float = 60.0
    _clock: _Periodic = field(init=False)
    _recommendations: deque[tuple[float, int]] = field(init=False, default_factory=deque)

    def __post_init__(self) -> None:
        self._clock = _Periodic(self.sync_period_s)

    def metric_total(self, view: ClusterView) -> float:
        history = view.history
        if self.metric == "tokens_per_s":
            # Prometheus rate() over a minute of prompt plus generated token counters.
            prompt = history.window("prompt_tokens_per_s", self.rate_window_s)
            generated = history.window("generated_tokens_per_s", self.rate_window_s)
            return float(np.mean(prompt + generated))
        if self.metric == "kv_usage":
            return history.last("kv_usage") * view.ready_replicas
        return history.last(self.metric)

    def decide(self, view: ClusterView) -> int | None:
        if not self._clock.due(view.now_s):
            return None
        current = view.live_replicas
        total = self.metric_total(view)
        ratio = total / (self.target * current) if current else math.inf
        recommendation = (
            current if abs(ratio - 1) <= self.tolerance else math.ceil(total / self.target)
        )
        self._recommendations.append((view.now_s, recommendation))
        while self._recommendations[0][0] < view.now_s - self.stabilization_s:
            self._recommendations.popleft()
        if recommendation > current:
            return min(recommendation, max(2 * current, current + 4))
        stabilized = min(current, max(r for _, r in self._recommendations))
        return stabilized if stabilized < current else None

    def reasons(self) -> dict[str, int]:
        return {}


@dataclass
class KpaPolicy:
    """Knative KPA on concurrency (requests in flight), with stable and panic windows."""

    container_concurrency: float = 64.0
    target_utilization: float = 0.7
    name: str = "kpa"
    tick_s: float = 2.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    _clock: _Periodic = field(init=False)
    _panic_since: float | None = field(init=False, default=None)
    _panic_desired: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._clock = _Periodic(self.tick_s)

    def decide(self, view: ClusterView) -> int | None:
        if not self._clock.due(view.now_s):
            return None
        target = self.target_utilization * self.container_concurrency
        stable = float(np.mean(view.history.window("ongoing_requests", self.stable_window_s)))
        panic = float(np.mean(view.history.window("ongoing_requests", self.panic_window_s)))
        stable_desired = math.ceil(stable / target - 1e-9)
        panic_desired = math.ceil(panic / target - 1e-9)
        ready = max(1, view.ready_replicas)
        if panic_desired / ready >= self.panic_threshold:
            if self._panic_since is None:
                self._panic_desired = view.live_replicas
            self._panic_since = view.now_s
        elif self._panic_since is not None and view.now_s - self._panic_since >= 60.0:
            self._panic_since = None
        if self._panic_since is not None:
            # In panic only up: keep the highest count wanted since panic began.
            self._panic_desired = max(self._panic_desired, panic_desired)
            desired = self._panic_desired
        else:
            desired = stable_desired
        desired = min(desired, math.ceil(self.max_scale_up_rate * ready))
        desired = max(desired, math.floor(ready / self.max_scale_down_rate))
        return desired if desired != view.live_replicas else None

    def reasons(self) -> dict[str, int]:
        return {}


@dataclass
class RayServePolicy:
    """Ray Serve's default autoscaler on ongoing requests (queued plus running).

    Replicas report a time-weighted mean over `look_back_s` every `metrics_interval_s`; the
    controller checks every tick and acts once a decision has held for the up or down delay.
    """

    target_ongoing_requests: float = 2.0
    name: str = "rayserve"
    smoothing_factor: float = 1.0
    look_back_s: float = 30.0
    metrics_interval_s: float = 10.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    _report: _Periodic = field(init=False)
    _reported: float = field(init=False, default=0.0)
    _counter_s: float = field(init=False, default=0.0)
    _last_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._report = _Periodic(self.metrics_interval_s)

    def decide(self, view: ClusterView) -> int | None:
        if self._report.due(view.now_s):
            self._reported = float(
                np.mean(view.history.window("ongoing_requests", self.look_back_s))
            )
        step = view.now_s - self._last_s if self._last_s is not None else 0.0
        self._last_s = view.now_s
        current = view.live_replicas
        raw = self._reported / self.target_ongoing_requests
        desired = max(1, math.ceil(current + self.smoothing_factor * (raw - current) - 1e-9))
        if desired > current:
            self._counter_s = max(self._counter_s, 0.0) + step
            if self._counter_s >= self.upscale_delay_s:
                self._counter_s = 0.0
                return desired
        elif desired < current:
            self._counter_s = min(self._counter_s, 0.0) - step
            if -self._counter_s >= self.downscale_delay_s:
                self._counter_s = 0.0
                return desired
        else:
            self._counter_s = 0.0
        return None

    def reasons(self) -> dict[str, int]:
        return {}


@dataclass
class OraclePolicy:
    """Follows a plan made from the future: replicas needed per minute, started ahead of time."""

    plan_per_minute: FloatArray
    lead_s: float
    name: str = "oracle"

    def decide(self, view: ClusterView) -> int | None:
        last = len(self.plan_per_minute) - 1
        now_minute = min(int(view.now_s // 60), last)
        ahead_minute = min(int((view.now_s + self.lead_s) // 60), last)
        desired = int(max(self.plan_per_minute[now_minute], self.plan_per_minute[ahead_minute]))
        return desired if desired != view.live_replicas else None

    def reasons(self) -> dict[str, int]:
        return {}


@dataclass
class TokenPolicy:
    """Adapter: feeds the project's pure policy samples every `sample_period_s`, as the operator's
    timer would from Prometheus, and remembers the last scale-up for its cooldown."""

    config: TokenPolicyConfig
    name: str = "token"
    sample_period_s: float = 5.0
    _clock: _Periodic = field(init=False)
    _samples: deque[MetricSample] = field(init=False)
    _last_scale_up_s: float | None = field(init=False, default=None)
    _reasons: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._clock = _Periodic(self.sample_period_s)
        keep_s = max(self.config.effective_scale_down_window_s, self.config.trend_window_s) + 60
        self._samples = deque(maxlen=int(keep_s / self.sample_period_s) + 2)

    def decide(self, view: ClusterView) -> int | None:
        if not self._clock.due(view.now_s):
            return None
        history = view.history
        prompt = history.window("prompt_tokens_per_s", self.sample_period_s)
        generated = history.window("generated_tokens_per_s", self.sample_period_s)
        self._samples.append(
            MetricSample(
                time_s=view.now_s,
                prompt_tokens_per_s=float(np.mean(prompt)),
                generated_tokens_per_s=float(np.mean(generated)),
                waiting_tokens=history.last("waiting_tokens"),
                ready_replicas=view.ready_replicas,
                current_replicas=view.live_replicas,
            )
        )
        decision = decide_replicas(
            list(self._samples), self.config, view.now_s, view.live_replicas, self._last_scale_up_s
        )
        self._reasons[decision.reason.value] = self._reasons.get(decision.reason.value, 0) + 1
        if decision.desired_replicas > view.live_replicas:
            self._last_scale_up_s = view.now_s
        if decision.desired_replicas == view.live_replicas:
            return None
        return decision.desired_replicas

    def reasons(self) -> dict[str, int]:
        return dict(self._reasons)


def oracle_plan(
    tokens_per_minute: FloatArray,
    capacity_tokens_per_s: float,
    cold_start_s: float,
    min_replicas: int,
    max_replicas: int,
) -> FloatArray:
    """Replicas the oracle keeps each minute: what that minute's demand needs at full capacity,
    with dips shorter than a cold start filled (giving a replica back and starting it again
    would cost more than keeping it)."""
    need = np.ceil(tokens_per_minute / 60.0 / capacity_tokens_per_s - 1e-9)
    need = np.clip(need, min_replicas, max_replicas)
    reach = max(1, math.ceil(cold_start_s / 60.0))
    plan = need.copy()
    for m in range(len(need)):
        before = need[max(0, m - reach) : m]
        after = need[m + 1 : m + 1 + reach]
        if len(before) and len(after):
            plan[m] = max(need[m], min(before.max(), after.max()))
    return plan.astype(np.float64)


def oracle_replica_seconds(plan: FloatArray, cold_start_s: float, initial: int) -> float:
    """Cost of following the plan: replica-minutes plus a cold start for every replica added."""
    added = np.maximum(np.diff(np.concatenate([[initial], plan])), 0.0)
    return float(plan.sum() * 60.0 + added.sum() * cold_start_s)
