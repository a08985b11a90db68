"""Replay one trace against one policy and measure it: SLO attainment, latency percentiles, cost
in replica-hours against the oracle, stability, provisioning and the response to a load step.

Deterministic for a seed: the seed picks each new replica's cold start within +-jitter and the
router's tie-breaking (synthetic traces and rate scaling take their own seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llama4_operator.planners.autoscaling import TokenPolicyConfig
from llama4_operator.simulator.engine import (
    ARRIVAL,
    FINISH,
    FIRST_TOKEN,
    OUTPUT,
    ClusterEngine,
)
from llama4_operator.simulator.model import ReplicaModel
from llama4_operator.simulator.policies import (
    POLICY_NAMES,
    ClusterView,
    History,
    HpaPolicy,
    KpaPolicy,
    OraclePolicy,
    Policy,
    RayServePolicy,
    TokenPolicy,
    oracle_plan,
    oracle_replica_seconds,
)
from llama4_operator.simulator.traces import Trace

REVERSAL_WINDOW_S = 600.0


@dataclass(frozen=True)
class SimulationSettings:
    """Options of one replay. `replica_capacity_tokens_per_s` is C*, the tokens/s one replica
    sustains within the SLO (see `capacity.calibrate_replica_capacity`)."""

    replica_capacity_tokens_per_s: float
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    cold_start_s: float = 300.0
    cold_start_jitter: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 64
    tick_s: float = 1.0
    drain_tail_s: float = 300.0
    seed: int = 0
    step_at_s: float | None = None
    model: ReplicaModel = field(default_factory=ReplicaModel)

    def __post_init__(self) -> None:
        checks = {
            "replica_capacity_tokens_per_s": self.replica_capacity_tokens_per_s > 0,
            "ttft_slo_s": self.ttft_slo_s > 0,
            "tpot_slo_s": self.tpot_slo_s > 0,
            "cold_start_s": self.cold_start_s >= 0,
            "cold_start_jitter": 0 <= self.cold_start_jitter < 1,
            # 0: scale to zero; requests then wait at the router until a replica is ready.
            "min_replicas": self.min_replicas >= 0,
            "max_replicas": self.max_replicas >= max(self.min_replicas, 1),
            "tick_s": 0 < self.tick_s <= 5,
            "drain_tail_s": self.drain_tail_s >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"{name}={value} is out of range (see `llama4ctl simulate -h`)")


@dataclass(frozen=True)
class SimulationResult:
    """Everything measured in one replay; `as_dict` is what `llama4ctl simulate --json` prints."""

    policy: str
    trace: str
    requests: int
    slo_attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    replica_hours: float
    gpu_hours: float
    oracle_replica_hours: float
    cost_vs_oracle: float
    scaling_actions: int
    reversals: int
    provisioning_ratio: float
    under_provisioned_fraction: float
    over_provisioned_fraction: float
    peak_backlog_tokens: float
    replica_capacity_tokens_per_s: float
    cold_start_s: float
    seed: int
    first_decision_after_step_s: float | None = None
    capacity_meets_demand_after_step_s: float | None = None
    actions: tuple[tuple[float, int, int], ...] = ()
    reasons: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self, with_actions: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["reasons"] = dict(self.reasons)
        if with_actions:
            data["actions"] = [list(a) for a in self.actions]
        else:
            data.pop("actions")
        return data


def make_policy(
    name: str,
    settings: SimulationSettings,
    trace: Trace,
    knobs: Mapping[str, Any] | None = None,
) -> Policy:
    """Build a policy by name; `knobs` override its usual settings (the benchmark's sweep)."""
    knobs = dict(knobs or {})
    capacity = settings.replica_capacity_tokens_per_s
    if name == "token":
        config = TokenPolicyConfig(
            capacity_tokens_per_s=capacity,
            min_replicas=settings.min_replicas,
            max_replicas=settings.max_replicas,
            cold_start_s=settings.cold_start_s,
            **knobs,
        )
        return TokenPolicy(config)
    if name == "hpa":
        return HpaPolicy(**{"metric": "waiting_requests", "target": 5.0, **knobs})
    if name == "keda-tokens":
        target = knobs.pop("target_fraction", 0.8) * capacity
        return HpaPolicy(metric="tokens_per_s", target=target, name="keda-tokens", **knobs)
    if name == "kpa":
        return KpaPolicy(**{"container_concurrency": settings.model.max_num_seqs, **knobs})
    if name == "rayserve":
        return RayServePolicy(**{"target_ongoing_requests": 2.0, **knobs})
    if name == "oracle":
        plan = oracle_plan(
            trace.tokens_per_minute(),
            capacity,
            settings.cold_start_s,
            settings.min_replicas,
            settings.max_replicas,
        )
        lead = settings.cold_start_s * (1 + settings.cold_start_jitter)
        return OraclePolicy(plan, lead)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def count_reversals(actions: list[tuple[float, int, int]], start: float, end: float) -> int:
    """Scale-ups followed by a scale-down within 10 minutes, both inside [start, end)."""
    inside = [a for a in actions if start <= a[0] < end]
    reversals = 0
    for i, (t_up, before, after) in enumerate(inside):
        if after <= before:
            continue
        if any(t - t_up <= REVERSAL_WINDOW_S and b2 > a2 for t, b2, a2 in inside[i + 1 :]):
            reversals += 1
    return reversals


def _percentile(values: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


@dataclass
class _Replay:
    history: History
    actions: list[tuple[float, int, int]]
    ready_per_tick: np.ndarray[Any, np.dtype[np.float64]]
    replica_seconds_in_trace: float


def _replay(
    engine: ClusterEngine,
    policy: Policy,
    settings: SimulationSettings,
    end_of_trace: float,
    stop: float,
) -> _Replay:
    """Tick by tick: advance the engine, record the metrics, ask the policy, act on it."""
    rng = np.random.default_rng(settings.seed)
    ticks = math.ceil(stop / settings.tick_s)
    history = History(ticks + 1, settings.tick_s)
    actions: list[tuple[float, int, int]] = []
    ready_per_tick = np.zeros(ticks, dtype=np.float64)
    in_trace: float | None = None
    previous_prompt = previous_generated = 0.0
    for tick in range(1, ticks + 1):
        now = tick * settings.tick_s
        engine.advance(now)
        if in_trace is None and now >= end_of_trace:
            in_trace = engine.replica_seconds() - (now - end_of_trace) * engine.live
        gauges = engine.gauges()
        ready = engine.ready
        live = engine.live
        prompt_total, generated_total = float(engine.totals[0]), float(engine.totals[1])
        history.append(
            time_s=now,
            prompt_tokens_per_s=(prompt_total - previous_prompt) / settings.tick_s,
            generated_tokens_per_s=(generated_total - previous_generated) / settings.tick_s,
            waiting_requests=gauges.waiting_requests,
            waiting_tokens=gauges.waiting_tokens,
            running_requests=gauges.running_requests,
            ongoing_requests=gauges.ongoing_requests,
            kv_usage=gauges.kv_live_tokens / (max(ready, 1) * settings.model.kv_capacity_tokens),
            ready_replicas=ready,
            live_replicas=live,
        )
        previous_prompt, previous_generated = prompt_total, generated_total
        ready_per_tick[tick - 1] = ready
        desired = policy.decide(ClusterView(now, live, ready, history))
        if desired is None:
            continue
        desired = min(max(desired, settings.min_replicas), settings.max_replicas)
        if desired == live:
            continue
        actions.append((now, live, desired))
        for _ in range(desired - live):
            jitter = rng.uniform(-settings.cold_start_jitter, settings.cold_start_jitter)
            engine.add_replica(settings.cold_start_s * (1 + jitter))
        for _ in range(live - desired):
            engine.remove_replica()
    if in_trace is None:
        in_trace = engine.replica_seconds()
    return _Replay(history, actions, ready_per_tick, float(in_trace))


def _latencies(
    engine: ClusterEngine, settings: SimulationSettings, stop: float
) -> dict[str, float]:
    """SLO attainment and percentiles. A request that never got its first token counts as a
    miss, and its TTFT is censored at the end of the run (a lower bound)."""
    times = engine.req_time
    arrival = times[:, ARRIVAL]
    first_raw, finish_raw = times[:, FIRST_TOKEN], times[:, FINISH]
    first = np.where(np.isnan(first_raw) | (first_raw < 0), np.inf, first_raw)
    finish = np.where(np.isnan(finish_raw) | (finish_raw < 0), np.inf, finish_raw)
    output = engine.req_tok[:, OUTPUT].astype(np.float64)
    done = np.isfinite(finish)
    tpot = np.full(len(arrival), np.inf)
    tpot[done] = np.where(
        output[done] > 1, (finish[done] - first[done]) / np.maximum(output[done] - 1, 1), 0.0
    )
    ttft = first - arrival
    met = (ttft <= settings.ttft_slo_s) & (tpot <= settings.tpot_slo_s)
    ttft_censored = np.minimum(ttft, stop - arrival)
    return {
        "slo_attainment": float(met.mean()),
        "ttft_p50_s": _percentile(ttft_censored, 50),
        "ttft_p90_s": _percentile(ttft_censored, 90),
        "ttft_p99_s": _percentile(ttft_censored, 99),
        "tpot_p50_s": _percentile(tpot[done], 50),
        "tpot_p99_s": _percentile(tpot[done], 99),
    }


def _provisioning(
    ready_per_tick: np.ndarray[Any, np.dtype[np.float64]],
    demand_per_minute: np.ndarray[Any, np.dtype[np.float64]],
    capacity: float,
    tick_s: float,
) -> dict[str, float]:
    """Ready capacity against arriving tokens, minute by minute over the trace."""
    per_minute = max(1, round(60 / tick_s))
    minutes = len(demand_per_minute)
    padded = np.resize(ready_per_tick, minutes * per_minute)
    padded[len(ready_per_tick) :] = ready_per_tick[-1]
    ready_minutes = padded.reshape(minutes, per_minute).mean(axis=1)
    demand_rate = demand_per_minute / 60.0
    need = np.ceil(demand_rate / capacity - 1e-9)
    return {
        "provisioning_ratio": float((ready_minutes * capacity).sum())
        / max(float(demand_rate.sum()), 1e-9),
        "under_provisioned_fraction": float(np.mean(ready_minutes < need - 1e-9)),
        "over_provisioned_fraction": float(np.mean(ready_minutes > need + 1e-9)),
    }


def _step_response(
    trace: Trace, replay: _Replay, step_at_s: float, capacity: float
) -> dict[str, float | None]:
    """Time from the step to the first scale-up, and until ready capacity meets the new load."""
    ups = [t for t, before, after in replay.actions if t >= step_at_s and after > before]
    after = trace.arrival_s >= step_at_s
    new_rate = float((trace.prompt_tokens + trace.output_tokens)[after].sum()) / max(
        trace.duration_s - step_at_s, 1e-9
    )
    times_s = replay.history.column("time_s")
    ready = replay.history.column("ready_replicas")
    ok = np.flatnonzero((times_s >= step_at_s) & (ready * capacity >= new_rate))
    return {
        "first_decision_after_step_s": ups[0] - step_at_s if ups else None,
        "capacity_meets_demand_after_step_s": float(times_s[ok[0]] - step_at_s)
        if len(ok)
        else None,
    }


def simulate(
    trace: Trace,
    policy_name: str,
    settings: SimulationSettings,
    knobs: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Replay `trace` against the policy and measure it."""
    policy = make_policy(policy_name, settings, trace, knobs)
    capacity = settings.replica_capacity_tokens_per_s
    engine = ClusterEngine(trace, settings.model, settings.max_replicas, seed=settings.seed)
    demand_per_minute = trace.tokens_per_minute()
    plan = oracle_plan(
        demand_per_minute,
        capacity,
        settings.cold_start_s,
        settings.min_replicas,
        settings.max_replicas,
    )
    # Start warm, sized for the first minutes (as if the service had been running before the
    # trace began), so that the trace's first ramp does not measure a cold cluster.
    initial = int(plan[: 1 + math.ceil(settings.cold_start_s / 60.0)].max())
    for _ in range(initial):
        engine.add_replica(0.0)
    stop = trace.duration_s + settings.drain_tail_s
    replay = _replay(engine, policy, settings, trace.duration_s, stop)
    step: dict[str, float | None] = {}
    if settings.step_at_s is not None:
        step = _step_response(trace, replay, settings.step_at_s, capacity)
    end_tick = min(len(replay.ready_per_tick), math.ceil(trace.duration_s / settings.tick_s))
    replica_hours = replay.replica_seconds_in_trace / 3600.0
    oracle_hours = oracle_replica_seconds(plan, settings.cold_start_s, initial) / 3600.0
    return SimulationResult(
        policy=policy.name,
        trace=trace.name,
        requests=trace.requests,
        **_latencies(engine, settings, stop),
        replica_hours=replica_hours,
        gpu_hours=replica_hours * settings.model.gpus_per_replica,
        oracle_replica_hours=oracle_hours,
        cost_vs_oracle=replica_hours / oracle_hours,
        scaling_actions=len(replay.actions),
        reversals=count_reversals(replay.actions, 0.0, stop),
        **_provisioning(replay.ready_per_tick, demand_per_minute, capacity, settings.tick_s),
        peak_backlog_tokens=float(
            replay.history.column("waiting_tokens")[:end_tick].max(initial=0.0)
        ),
        replica_capacity_tokens_per_s=capacity,
        cold_start_s=settings.cold_start_s,
        seed=settings.seed,
        first_decision_after_step_s=step.get("first_decision_after_step_s"),
        capacity_meets_demand_after_step_s=step.get("capacity_meets_demand_after_step_s"),
        actions=tuple(replay.actions),
        reasons=policy.reasons(),
    )
