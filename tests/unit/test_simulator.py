"""The simulator: the replica model's arithmetic by hand, the baselines' documented mechanics,
the oracle, traces, determinism and speed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from llama4_operator.simulator.engine import FINISH, FIRST_TOKEN, ClusterEngine
from llama4_operator.simulator.model import ReplicaModel
from llama4_operator.simulator.policies import (
    ClusterView,
    History,
    HpaPolicy,
    KpaPolicy,
    RayServePolicy,
    oracle_plan,
)
from llama4_operator.simulator.simulation import SimulationSettings, count_reversals, simulate
from llama4_operator.simulator.traces import (
    Trace,
    TraceError,
    daily_cycle_trace,
    load_trace,
    scale_rate,
    step_trace,
)

A, B, C = 0.01, 1e-4, 1e-6
SMALL = ReplicaModel(
    iteration_base_s=A,
    prefill_s_per_token=B,
    decode_s_per_context_token=C,
    prefill_budget_tokens=100,
    max_num_seqs=4,
    kv_capacity_tokens=10_000,
)
TRACES = Path(__file__).resolve().parents[2] / "benchmarks" / "autoscaling" / "traces"


def _trace(arrivals: list[float], prompts: list[int], outputs: list[int]) -> Trace:
    return Trace(
        "hand",
        np.asarray(arrivals, dtype=np.float64),
        np.asarray(prompts, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
    )


def _run(trace: Trace, until: float, replicas: int = 1, cold_start_s: float = 0.0) -> ClusterEngine:
    engine = ClusterEngine(trace, SMALL, max_replicas=4)
    for _ in range(replicas):
        engine.add_replica(cold_start_s)
    engine.advance(until)
    return engine


def test_single_request_on_idle_replica_follows_the_iteration_formula() -> None:
    engine = _run(_trace([1.234], [80], [5]), until=10.0)
    first = 1.234 + A + B * 80
    # Four decode steps; step j reads the prompt, the first token and j earlier outputs.
    finish = first + sum(A + C * (80 + 1 + j) for j in range(4))
    assert engine.req_time[0, FIRST_TOKEN] == pytest.approx(first, abs=1e-12)
    assert engine.req_time[0, FINISH] == pytest.approx(finish, abs=1e-12)


def test_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    engine = _run(_trace([0.0], [250], [1]), until=10.0)
    # 250 tokens with a 100-token budget: chunks of 100, 100 and 50.
    assert engine.req_time[0, FIRST_TOKEN] == pytest.approx(3 * A + B * 250)
    assert engine.req_time[0, FINISH] == engine.req_time[0, FIRST_TOKEN]


def test_simultaneous_requests_share_one_prefill_iteration() -> None:
    engine = _run(_trace([0.0, 0.0], [30, 40], [1, 1]), until=10.0)
    assert engine.req_time[0, FIRST_TOKEN] == pytest.approx(A + B * 70)
    assert engine.req_time[1, FIRST_TOKEN] == pytest.approx(A + B * 70)


def test_request_waits_for_a_free_sequence_slot() -> None:
    one_slot = ReplicaModel(
        iteration_base_s=A,
        prefill_s_per_token=B,
        decode_s_per_context_token=0.0,
        prefill_budget_tokens=100,
        max_num_seqs=1,
    )
    engine = ClusterEngine(_trace([0.0, 0.001], [10, 10], [3, 1]), one_slot, max_replicas=1)
    engine.add_replica(0.0)
    engine.advance(5.0)
    first_done = A + B * 10 + 2 * A
    assert engine.req_time[0, FINISH] == pytest.approx(first_done)
    # The router holds the second request until its next hand-out after the slot frees
    # (every `sync_s` = 0.1 s), then it is prefilled alone.
    next_hand_out = math.ceil(first_done / engine.sync_s) * engine.sync_s
    assert engine.req_time[1, FIRST_TOKEN] == pytest.approx(next_hand_out + A + B * 10)


def test_request_larger_than_the_kv_cache_is_rejected() -> None:
    engine = _run(_trace([0.0], [9_990], [20]), until=5.0)
    assert engine.req_time[0, FIRST_TOKEN] == -1.0


def test_new_replica_serves_only_after_its_cold_start() -> None:
    engine = _run(_trace([10.0], [50], [1]), until=100.0, cold_start_s=60.0)
    assert engine.req_time[0, FIRST_TOKEN] == pytest.approx(60.0 + A + B * 50)


def test_removed_replica_drains_its_requests_then_stops_costing() -> None:
    engine = ClusterEngine(_trace([0.0], [10], [200]), SMALL, max_replicas=2)
    engine.add_replica(0.0)
    engine.advance(0.5)
    engine.remove_replica()
    assert engine.live == 0
    engine.advance(20.0)
    finish = engine.req_time[0, FINISH]
    assert 0.5 < finish < 20.0
    assert engine.replica_seconds() == pytest.approx(finish)


def _view(now: float, live: int, ready: int, history: History) -> ClusterView:
    return ClusterView(now, live, ready, history)


def _history(field: str, values: list[float], tick_s: float = 1.0) -> History:
    history = History(len(values) + 1, tick_s)
    for i, value in enumerate(values):
        history.append(time_s=(i + 1) * tick_s, **{field: value})
    return history


def test_hpa_stabilization_window_holds_a_scale_down_for_300_s() -> None:
    hpa = HpaPolicy(metric="waiting_requests", target=5.0)
    history = _history("waiting_requests", [40.0])
    assert hpa.decide(_view(0.0, 8, 8, history)) is None  # 40 / 5 = 8: on target
    history.append(time_s=1.0, waiting_requests=5.0)
    for now in np.arange(15.0, 300.0, 15.0):
        assert hpa.decide(_view(float(now), 8, 8, history)) is None, now
    # 315 s after the high recommendation it has left the window.
    assert hpa.decide(_view(315.0, 8, 8, history)) == 1


def test_hpa_scale_up_is_limited_to_double_or_four_pods_per_sync() -> None:
    hpa = HpaPolicy(metric="waiting_requests", target=1.0)
    history = _history("waiting_requests", [100.0])
    assert hpa.decide(_view(0.0, 2, 2, history)) == 6  # max(2 x 2, 2 + 4)
    assert hpa.decide(_view(15.0, 10, 10, history)) == 20  # max(2 x 10, 10 + 4)


def test_hpa_ignores_changes_within_its_tolerance() -> None:
    hpa = HpaPolicy(metric="waiting_requests", target=5.0)
    assert hpa.decide(_view(0.0, 10, 10, _history("waiting_requests", [54.0]))) is None
    hpa = HpaPolicy(metric="waiting_requests", target=5.0)
    assert hpa.decide(_view(0.0, 10, 10, _history("waiting_requests", [56.0]))) == 12


def test_kpa_panics_on_a_burst_and_does_not_scale_down_until_60_s_calm() -> None:
    kpa = KpaPolicy(container_concurrency=10.0)  # target 7 per replica
    history = _history("ongoing_requests", [7.0] * 60)
    assert kpa.decide(_view(60.0, 1, 1, history)) is None
    for _ in range(6):
        history.append(ongoing_requests=70.0)
    # Panic window mean 70 -> 10 replicas >= 2 x 1 ready: panic, straight to 10.
    assert kpa.decide(_view(66.0, 1, 1, history)) == 10
    for _ in range(10):
        history.append(ongoing_requests=7.0)
    # The load is gone, but in panic it keeps the highest count seen.
    assert kpa.decide(_view(76.0, 10, 1, history)) is None
    for _ in range(60):
        history.append(ongoing_requests=7.0)
    # 60 s without a breach ends panic; the stable window (mean 7) wants 1, but one tick may
    # halve the ready count at most.
    assert kpa.decide(_view(136.0, 10, 10, history)) == 5


def test_kpa_stable_mode_uses_the_60_s_mean() -> None:
    kpa = KpaPolicy(container_concurrency=10.0)
    history = _history("ongoing_requests", [7.0] * 30 + [21.0] * 30)
    # Mean 14 over 60 s / 7 = 2; the panic window wants 3 < 2 x 2 ready: no panic.
    assert kpa.decide(_view(60.0, 2, 2, history)) is None
    kpa = KpaPolicy(container_concurrency=10.0)
    history = _history("ongoing_requests", [28.0] * 60)
    assert kpa.decide(_view(60.0, 3, 3, history)) == 4


def test_rayserve_waits_30_s_to_scale_up_and_600_s_to_scale_down() -> None:
    ray = RayServePolicy(target_ongoing_requests=2.0)
    history = _history("ongoing_requests", [8.0] * 30)  # 8 / 2 = 4 replicas wanted
    decisions = {t: ray.decide(_view(float(t), 1, 1, history)) for t in range(30, 61)}
    assert [t for t, d in decisions.items() if d is not None] == [60]
    assert decisions[60] == 4
    ray = RayServePolicy(target_ongoing_requests=2.0)
    history = _history("ongoing_requests", [2.0] * 30)  # 1 replica wanted
    decisions = {t: ray.decide(_view(float(t), 4, 4, history)) for t in range(30, 700)}
    assert [t for t, d in decisions.items() if d is not None] == [630]
    assert decisions[630] == 1


def test_oracle_plan_never_falls_below_demand() -> None:
    rng = np.random.default_rng(3)
    demand = rng.uniform(0, 60 * 10 * 1000.0, size=240)
    plan = oracle_plan(demand, 1000.0, cold_start_s=300.0, min_replicas=1, max_replicas=64)
    assert np.all(plan >= np.ceil(demand / 60.0 / 1000.0 - 1e-9))
    assert np.all(plan >= 1)


def _conv_sizes() -> Trace:
    return load_trace(TRACES / "azure-2023-conv.csv")


def test_oracle_replay_keeps_ready_capacity_at_demand() -> None:
    trace = step_trace(_conv_sizes(), 20_000.0, 3.0, seed=1, before_s=600, after_s=600)
    settings = SimulationSettings(replica_capacity_tokens_per_s=10_000.0, cold_start_s=120.0)
    result = simulate(trace, "oracle", settings)
    assert result.under_provisioned_fraction == 0.0
    assert result.replica_hours == pytest.approx(result.oracle_replica_hours, rel=0.05)


def test_replay_is_deterministic_for_a_seed() -> None:
    trace = step_trace(_conv_sizes(), 30_000.0, 2.0, seed=0, before_s=300, after_s=300)
    settings = SimulationSettings(replica_capacity_tokens_per_s=15_000.0, cold_start_s=60.0)
    first = simulate(trace, "token", settings).as_dict(with_actions=True)
    second = simulate(trace, "token", settings).as_dict(with_actions=True)
    assert first == second


def test_reversals_count_a_scale_up_undone_within_10_minutes() -> None:
    actions = [(0.0, 2, 4), (500.0, 4, 3), (1000.0, 3, 5), (1700.0, 5, 2)]
    assert count_reversals(actions, 0.0, 2000.0) == 1


def test_csv_timestamps_as_dates_or_seconds_give_the_same_trace(tmp_path: Path) -> None:
    dated = tmp_path / "dated.csv"
    dated.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,100,10\n"
        "2023-11-16 18:17:05.4799600,200,20\n"
    )
    seconds = tmp_path / "seconds.csv"
    seconds.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.0,100,10\n11.5,200,20\n")
    a, b = load_trace(dated), load_trace(seconds)
    np.testing.assert_allclose(a.arrival_s, [0.0, 1.5])
    np.testing.assert_allclose(b.arrival_s, [0.0, 1.5])
    assert list(a.prompt_tokens) == [100, 200]


def test_bad_trace_files_name_the_problem(tmp_path: Path) -> None:
    header = tmp_path / "header.csv"
    header.write_text("TIMESTAMP,Prompt,GeneratedTokens\n1,2,3\n")
    with pytest.raises(TraceError, match="ContextTokens"):
        load_trace(header)
    value = tmp_path / "value.csv"
    value.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,many,3\n")
    with pytest.raises(TraceError, match="row 2: ContextTokens"):
        load_trace(value)
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "missing.csv")


def test_rate_scaling_multiplies_requests_and_keeps_the_span() -> None:
    conv = _conv_sizes()
    scaled = scale_rate(conv, 3.0, seed=0)
    assert scaled.requests == 3 * conv.requests
    assert scaled.duration_s <= conv.duration_s
    half = scale_rate(conv, 2.5, seed=0)
    assert half.requests == pytest.approx(2.5 * conv.requests, rel=0.02)
    with pytest.raises(TraceError, match="rate scale"):
        scale_rate(conv, 0.0)


def test_daily_trace_follows_its_peak_to_trough_ratio() -> None:
    daily = daily_cycle_trace(_conv_sizes(), 50_000.0, seed=0)
    hourly = np.bincount((daily.arrival_s // 3600).astype(int), minlength=24)[:24]
    # Trough at 04:00, peak at 16:00; per-minute noise moves the busiest hour a little.
    assert 2 <= hourly.argmin() <= 6
    assert 13 <= hourly.argmax() <= 19
    assert 2.0 < hourly[14:19].mean() / hourly[2:7].mean() < 3.0
    tokens = float((daily.prompt_tokens + daily.output_tokens).sum())
    assert tokens / 86400 == pytest.approx(50_000.0, rel=0.05)


def test_an_hour_of_the_conversation_trace_replays_in_seconds() -> None:
    conv = _conv_sizes()
    settings = SimulationSettings(replica_capacity_tokens_per_s=2_000.0, cold_start_s=300.0)
    simulate(_trace([0.0], [10], [2]), "token", settings)  # compile outside the clock
    started = time.perf_counter()
    result = simulate(conv, "token", settings)
    elapsed = time.perf_counter() - started
    assert result.requests == conv.requests
    assert elapsed < 15.0, f"{elapsed:.1f}s"
    assert math.isfinite(result.ttft_p99_s)


def test_token_policy_scales_to_zero_and_queued_requests_wake_it() -> None:
    # Five minutes of light load, half an hour idle, then five requests.
    early = [2.0 * i for i in range(150)]
    late = [2400.0 + 2.0 * i for i in range(5)]
    arrivals = early + late
    trace = _trace(arrivals, [500] * len(arrivals), [50] * len(arrivals))
    settings = SimulationSettings(
        replica_capacity_tokens_per_s=18_000.0, cold_start_s=60.0, min_replicas=0
    )
    result = simulate(trace, "token", settings)
    moves = [(before, after) for _, before, after in result.actions]
    assert (1, 0) in moves  # idle past the scale-down window: no replica at all
    assert (0, 1) in moves  # the queued requests woke it
    woke_at = next(t for t, before, _ in result.actions if before == 0)
    assert 2400.0 <= woke_at <= 2405.0  # within one sample of the first queued request
    # Nothing is dropped: the late requests wait one cold start (+-10%) for their first token.
    assert result.requests == len(arrivals)
    assert result.ttft_p99_s == pytest.approx(60.0, abs=6.0 + 5.0)
    assert result.slo_attainment == pytest.approx(150 / 155)
