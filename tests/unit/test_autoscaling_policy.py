"""The `token` policy: stale data holds, bursts scale up at once, lulls scale down slowly,
cold start is looked ahead of, whole replicas within [min, max], no flapping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama4_operator.planners.autoscaling import (
    MetricSample,
    ScalingReason,
    TokenPolicyConfig,
    calibrate_capacity,
    decide_replicas,
    saturated_capacities,
)

CAPACITY = 1000.0  # tokens/s per replica


def _config(**overrides: object) -> TokenPolicyConfig:
    settings: dict[str, object] = {
        "capacity_tokens_per_s": CAPACITY,
        "cold_start_s": 300.0,
        "min_replicas": 1,
        "max_replicas": 20,
    }
    settings.update(overrides)
    return TokenPolicyConfig(**settings)  # type: ignore[arg-type]


def _steady(
    rate: float,
    replicas: int,
    start: float = 0.0,
    end: float = 1200.0,
    waiting: float = 0.0,
    every: float = 5.0,
) -> list[MetricSample]:
    """Samples of a flat load: 90% of tokens are prompt, 10% generated."""
    return [
        MetricSample(t, 0.9 * rate, 0.1 * rate, waiting, replicas, replicas)
        for t in np.arange(start + every, end + every / 2, every).tolist()
    ]


def test_no_samples_hold_the_current_count() -> None:
    decision = decide_replicas([], _config(), now_s=100.0, current_replicas=4)
    assert decision.desired_replicas == 4
    assert decision.reason is ScalingReason.HOLD_METRICS_STALE


def test_stale_samples_hold_even_when_they_showed_no_load() -> None:
    samples = _steady(0.0, 4, end=600.0)
    decision = decide_replicas(samples, _config(), now_s=700.0, current_replicas=4)
    assert decision.desired_replicas == 4
    assert decision.reason is ScalingReason.HOLD_METRICS_STALE


def test_zero_from_no_ready_replica_is_not_taken_as_no_load() -> None:
    samples = [MetricSample(t, 0.0, 0.0, 0.0, 0, 3) for t in range(5, 1205, 5)]
    decision = decide_replicas(samples, _config(), now_s=1200.0, current_replicas=3)
    assert decision.desired_replicas == 3
    assert decision.reason is ScalingReason.HOLD_METRICS_STALE


def test_stale_hold_still_honours_min_replicas() -> None:
    decision = decide_replicas([], _config(min_replicas=2), now_s=0.0, current_replicas=0)
    assert decision.desired_replicas == 2
    assert decision.reason is ScalingReason.CLAMP_MIN


def test_burst_with_backlog_scales_up_at_once_to_the_needed_count() -> None:
    samples = _steady(3000.0, 4)
    burst = [MetricSample(1200.0 + t, 5400.0, 600.0, 24_000.0, 4, 4) for t in (5, 10, 15, 20)]
    now = 1220.0
    config = _config()
    decision = decide_replicas(samples + burst, config, now_s=now, current_replicas=4)
    assert decision.reason is ScalingReason.SCALE_UP_BURST
    # Arriving tokens over the last 30 s: 4 samples at 6000 (the first also +24000/5 of
    # backlog growth) and two at 3000. Until new replicas are ready (300 s) the 4 live ones
    # fall short by `arriving - 4000`; that backlog is drained within 30 s of their start,
    # with at most as many extra replicas as the arriving rate needs (max_drain_gain 1).
    arriving = (4 * 6000.0 + 24_000.0 / 5 + 2 * 3000.0) / 6
    backlog_at_ready = 24_000.0 + (arriving - 4 * CAPACITY) * 300.0
    drain = min(backlog_at_ready / 30.0, arriving)
    assert decision.demand_tokens_per_s >= arriving + drain
    serve = arriving / (config.target_utilization * CAPACITY)
    assert decision.desired_replicas >= math.ceil(serve + drain / CAPACITY)
    # The rising trend adds at most 25% of the arriving rate.
    assert decision.desired_replicas <= math.ceil(1.25 * serve + drain / CAPACITY)
    # Without drain replicas, only the arriving rate (and its trend) is served.
    lean = decide_replicas(
        samples + burst, _config(max_drain_gain=0.0), now_s=now, current_replicas=4
    )
    assert math.ceil(serve) <= lean.desired_replicas <= math.ceil(1.25 * serve)


def test_rising_load_is_met_ahead_of_the_cold_start() -> None:
    # Rising by 2 tokens/s every second: in 300 s of cold start, 600 tokens/s more.
    samples = [
        MetricSample(t, 0.9 * (2000 + 2 * t), 0.1 * (2000 + 2 * t), 0.0, 4, 4)
        for t in np.arange(5.0, 600.0, 5.0).tolist()
    ]
    now = float(samples[-1].time_s)
    rate_now = 2000 + 2 * now
    config = _config(scale_up_utilization=0.9, target_utilization=0.8, scale_down_utilization=0.8)
    assert rate_now < 0.9 * CAPACITY * 4  # not short yet
    decision = decide_replicas(samples, config, now_s=now, current_replicas=4)
    assert decision.reason is ScalingReason.SCALE_UP_TREND
    assert decision.desired_replicas == 5


def test_lull_scales_down_only_after_the_window_and_to_its_peak() -> None:
    busy = _steady(7800.0, 10, start=0.0, end=600.0)  # needs 10 at 800 tokens/s each
    quiet = _steady(2000.0, 10, start=600.0, end=1800.0)
    samples = busy + quiet
    config = _config(
        scale_down_window_s=600.0,
        scale_up_utilization=0.9,
        target_utilization=0.8,
        scale_down_utilization=0.8,
    )
    # 300 s into the lull the busy minutes are still in the window.
    decision = decide_replicas(
        [s for s in samples if s.time_s <= 900.0], config, now_s=900.0, current_replicas=10
    )
    assert decision.reason is ScalingReason.HOLD_STABLE
    assert decision.desired_replicas == 10
    decision = decide_replicas(samples, config, now_s=1800.0, current_replicas=10)
    assert decision.reason is ScalingReason.SCALE_DOWN_LULL
    assert decision.desired_replicas == math.ceil(2000.0 / (0.8 * CAPACITY))


def test_no_scale_down_soon_after_a_scale_up() -> None:
    samples = _steady(2000.0, 10, end=1800.0)
    decision = decide_replicas(
        samples, _config(), now_s=1800.0, current_replicas=10, last_scale_up_s=1500.0
    )
    assert decision.reason is ScalingReason.HOLD_COOLDOWN
    assert decision.desired_replicas == 10


def test_no_scale_down_without_a_full_window_of_history() -> None:
    samples = _steady(1000.0, 10, end=200.0)
    decision = decide_replicas(samples, _config(), now_s=200.0, current_replicas=10)
    assert decision.desired_replicas == 10
    assert decision.reason is ScalingReason.HOLD_STABLE


def test_desired_count_is_clamped_to_max_and_min() -> None:
    samples = _steady(50_000.0, 4, waiting=1e6)
    decision = decide_replicas(samples, _config(max_replicas=8), now_s=1200.0, current_replicas=4)
    assert decision.desired_replicas == 8
    assert decision.reason is ScalingReason.CLAMP_MAX
    samples = _steady(10.0, 5, end=2400.0)
    decision = decide_replicas(samples, _config(min_replicas=3), now_s=2400.0, current_replicas=5)
    assert decision.desired_replicas == 3
    assert decision.reason is ScalingReason.CLAMP_MIN


def test_noisy_steady_load_does_not_flap() -> None:
    rng = np.random.default_rng(7)
    config = _config(cold_start_s=120.0)
    replicas, samples, changes = 6, [], 0
    last_up: float | None = None
    for step in range(1, 720):  # an hour of 5-second samples
        now = step * 5.0
        rate = 4000.0 * rng.lognormal(0.0, 0.1)
        samples.append(MetricSample(now, 0.9 * rate, 0.1 * rate, 0.0, replicas, replicas))
        decision = decide_replicas(samples[-200:], config, now, replicas, last_up)
        if decision.desired_replicas != replicas:
            changes += 1
            if decision.desired_replicas > replicas:
                last_up = now
            replicas = decision.desired_replicas
    assert changes <= 1
    assert replicas >= math.ceil(4000.0 / CAPACITY)


def test_capacity_is_calibrated_from_saturated_samples() -> None:
    saturated = [MetricSample(t, 2700.0, 300.0, 5000.0, 2, 2) for t in range(5, 60, 5)]
    idle = [MetricSample(t, 500.0, 50.0, 0.0, 2, 2) for t in range(60, 120, 5)]
    assert calibrate_capacity(saturated + idle, saturation_tokens=1.0) == pytest.approx(1500.0)
    assert calibrate_capacity(idle, saturation_tokens=1.0) is None
    # With calibration on, the measured 1500 tokens/s per replica replaces the set 1000.
    samples = _steady(3000.0, 2, end=1200.0) + saturated
    decision = decide_replicas(
        sorted(samples, key=lambda s: s.time_s),
        _config(calibrate=True),
        now_s=1200.0,
        current_replicas=2,
    )
    assert decision.capacity_tokens_per_s == pytest.approx(1500.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("capacity_tokens_per_s", 0.0, "capacity_tokens_per_s"),
        ("max_replicas", 0, "max_replicas"),
        ("target_utilization", 1.5, "target_utilization"),
        ("burst_window_s", 0.0, "burst_window_s"),
    ],
)
def test_bad_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**{field: value})


def test_a_surge_is_sized_from_the_short_window_while_the_backlog_keeps_growing() -> None:
    samples = _steady(3000.0, 4)
    # Served throughput is stuck at 3600 while the backlog grows by 30000 tokens per sample:
    # 3600 + 30000 / 5 = 9600 tokens/s arrive.
    surge = [MetricSample(1200.0 + 5 * k, 3240.0, 360.0, 30_000.0 * k, 4, 4) for k in (1, 2, 3)]
    now = 1215.0
    config = _config(max_replicas=64)
    decision = decide_replicas(samples + surge, config, now_s=now, current_replicas=4)
    assert decision.reason is ScalingReason.SCALE_UP_BURST
    assert decision.desired_replicas >= math.ceil(9600.0 / (0.9 * CAPACITY))
    # The same backlog seen once (a spike, not growth) is judged on the 30 s window only.
    spike = [MetricSample(1200.0 + 5 * k, 3240.0, 360.0, 0.0, 4, 4) for k in (1, 2)]
    spike.append(MetricSample(1215.0, 3240.0, 360.0, 90_000.0, 4, 4))
    calmer = decide_replicas(samples + spike, config, now_s=now, current_replicas=4)
    assert calmer.desired_replicas < decision.desired_replicas


def test_a_lasting_queue_replaces_the_set_capacity_with_the_measured_one() -> None:
    # 4 replicas serve 2800 tokens/s in all (700 each, below the set 1000) while 10 s of work
    # stays queued for 30 s: the mix of this load makes a replica serve 700, not 1000.
    samples = _steady(2800.0, 4) + [
        MetricSample(1200.0 + 5 * k, 2520.0, 280.0, 28_000.0, 4, 4) for k in range(1, 7)
    ]
    assert [c for _, c in saturated_capacities(samples, _config())] == [pytest.approx(700.0)]
    decision = decide_replicas(samples, _config(), now_s=1230.0, current_replicas=4)
    assert decision.capacity_tokens_per_s == pytest.approx(700.0)
    assert decision.reason is ScalingReason.SCALE_UP_BURST
    assert decision.desired_replicas >= math.ceil(2800.0 / (0.9 * 700.0))
    # A queue that lasts less than `saturation_window_s` is a burst, not a measurement.
    short = [*_steady(2800.0, 4), MetricSample(1205.0, 2520.0, 280.0, 28_000.0, 4, 4)]
    assert saturated_capacities(short, _config()) == []


def test_drain_replicas_grow_with_the_cold_start_up_to_the_cap() -> None:
    samples = _steady(3000.0, 4)
    burst = [MetricSample(1200.0 + t, 4320.0, 480.0, 2_000.0 * t, 4, 4) for t in (5, 10, 15)]
    decisions = {
        cold: decide_replicas(
            samples + burst, _config(cold_start_s=cold), now_s=1215.0, current_replicas=4
        ).desired_replicas
        for cold in (0.0, 60.0, 600.0)
    }
    # The longer new replicas take, the larger the backlog they must drain once ready.
    assert decisions[0.0] < decisions[60.0] < decisions[600.0]
    capped = decide_replicas(
        samples + burst,
        _config(cold_start_s=600.0, max_drain_gain=0.5),
        now_s=1215.0,
        current_replicas=4,
    )
    assert capped.desired_replicas < decisions[600.0]


def test_a_backlog_the_live_replicas_clear_before_a_cold_start_adds_no_replica() -> None:
    # 4 replicas serve 3800 of their 4000 tokens/s; 60,000 tokens wait and do not grow.
    # (Saturation is not measured here: it would replace the capacity with 950.)
    samples = _steady(3800.0, 4, waiting=60_000.0)
    settings = {"saturation_window_s": 1e6}
    # The 200 tokens/s to spare clear it in 300 s: a replica started now would come too late.
    slow = decide_replicas(
        samples, _config(cold_start_s=300.0, **settings), now_s=1200.0, current_replicas=4
    )
    assert slow.desired_replicas == 4
    # With a 30 s cold start, 54,000 tokens would still wait: drained within 30 s by 1800
    # tokens/s of extra replicas.
    fast = decide_replicas(
        samples, _config(cold_start_s=30.0, **settings), now_s=1200.0, current_replicas=4
    )
    assert fast.reason is ScalingReason.SCALE_UP_BURST
    assert fast.desired_replicas == math.ceil(3800.0 / 950.0 + 1800.0 / CAPACITY)


def test_a_ten_second_burst_is_not_projected_over_the_cold_start() -> None:
    # 3 replicas carry 2300 tokens/s; for 10 s, 3500 arrive and a small queue grows.
    samples = [
        *_steady(2300.0, 3),
        MetricSample(1205.0, 3150.0, 350.0, 2_000.0, 3, 3),
        MetricSample(1210.0, 3150.0, 350.0, 4_000.0, 3, 3),
    ]
    decision = decide_replicas(samples, _config(), now_s=1210.0, current_replicas=3)
    # The surge is served (the 10 s mean sizes the scale-up), but over 30 s the replicas
    # still have capacity to spare, so no backlog is projected and no drain replica added.
    assert decision.reason is ScalingReason.SCALE_UP_BURST
    surge = 3500.0 + 2_000.0 / 5
    assert decision.desired_replicas == math.ceil(surge / (0.95 * CAPACITY))


def test_with_min_replicas_0_an_idle_deployment_goes_to_zero_and_a_queue_wakes_it() -> None:
    config = _config(min_replicas=0, scale_down_window_s=600.0)
    idle = _steady(0.0, 1)
    asleep = decide_replicas(idle, config, now_s=1200.0, current_replicas=1)
    assert (asleep.desired_replicas, asleep.reason) == (0, ScalingReason.SCALE_DOWN_LULL)
    # At zero nothing is served; requests wait at the router and their prompts show as queued.
    waiting = [
        *[MetricSample(s.time_s, 0.0, 0.0, 0.0, 0, 0) for s in idle],
        MetricSample(1205.0, 0.0, 0.0, 3_000.0, 0, 0),
    ]
    awake = decide_replicas(waiting, config, now_s=1205.0, current_replicas=0)
    assert awake.reason is ScalingReason.SCALE_UP_BURST
    assert awake.desired_replicas >= 1
    still = decide_replicas(waiting[:-1], config, now_s=1200.0, current_replicas=0)
    assert still.desired_replicas == 0


def test_a_three_minute_swing_is_not_taken_for_a_ramp() -> None:
    # Flat at 3300 tokens/s, then 400 more over the last 3 minutes (a swing of the noise).
    def level(t: float) -> float:
        return 3300.0 + max(0.0, t - 1020.0) * 400.0 / 180.0

    samples = [
        MetricSample(t, 0.9 * level(t), 0.1 * level(t), 0.0, 4, 4)
        for t in np.arange(5.0, 1205.0, 5.0).tolist()
    ]
    # Over the default 10 minutes the slope is shallow: 3700 plus its projection stays
    # within the 4000 tokens/s of 4 replicas.
    calm = decide_replicas(samples, _config(), now_s=1200.0, current_replicas=4)
    assert calm.reason is ScalingReason.HOLD_STABLE
    # Fitted to the 3 minutes alone, the same swing would look like a ramp.
    hasty = decide_replicas(
        samples, _config(trend_window_s=180.0), now_s=1200.0, current_replicas=4
    )
    assert hasty.reason is ScalingReason.SCALE_UP_TREND


def test_a_trend_scale_up_needs_the_trend_on_a_minute_of_demand_not_half_a_minute() -> None:
    # 4 replicas (4000 tokens/s) carry a load rising by 1 token/s every second; in the last
    # 30 s 3750 arrive, the 30 s before 3250, and no queue forms.
    def level(t: float) -> float:
        return 2300.0 + t

    samples = [
        MetricSample(t, 0.9 * level(t), 0.1 * level(t), 0.0, 4, 4)
        for t in np.arange(5.0, 1145.0, 5.0).tolist()
    ]
    samples += _steady(3250.0, 4, start=1140.0, end=1170.0)
    samples += _steady(3750.0, 4, start=1170.0, end=1200.0)
    # 3750 plus the trend's projection (about 300) passes 4000, the minute's 3500 plus it not.
    held = decide_replicas(samples, _config(), now_s=1200.0, current_replicas=4)
    assert (held.desired_replicas, held.reason) == (4, ScalingReason.HOLD_STABLE)
    assert "over 60s and no queue" in held.message
    # Judged on the 30 s window alone, the same samples scale up.
    hasty = decide_replicas(
        samples, _config(scale_up_confirm_window_s=30.0), now_s=1200.0, current_replicas=4
    )
    assert hasty.reason is ScalingReason.SCALE_UP_TREND
    # A queue of more than `saturation_queue_s` of work needs no confirmation.
    queued = [*samples[:-1], MetricSample(1200.0, 3420.0, 380.0, 8_000.0, 4, 4)]
    assert decide_replicas(queued, _config(), now_s=1200.0, current_replicas=4).desired_replicas > 4


def _saturated_while_replicas_start(asked_at_s: float) -> list[MetricSample]:
    """4 ready replicas serve 4000 tokens/s in all while 5000 arrive from 1150 s on, so the
    backlog grows by 1000 tokens/s; 4 more replicas, asked for at `asked_at_s`, still start."""
    samples = []
    for t in np.arange(5.0, 1205.0, 5.0).tolist():
        waiting = max(0.0, 1000.0 * (t - 1150.0))
        asked = 8 if t > asked_at_s else 4
        samples.append(MetricSample(t, 3600.0, 400.0, waiting, 4, asked))
    return samples


def test_replicas_still_starting_do_not_drain_a_growing_backlog_before_they_are_ready() -> None:
    config = _config(cold_start_s=300.0, max_replicas=64)
    # Asked for 10 s ago, the 4 starting replicas serve only from 290 s on; until then the
    # backlog grows by 1000 tokens/s, and it must be drained once new replicas are ready.
    late = decide_replicas(
        _saturated_while_replicas_start(1190.0), config, now_s=1200.0, current_replicas=8
    )
    assert late.reason is ScalingReason.SCALE_UP_BURST
    # 5000 tokens/s at 950 each, plus 5000 tokens/s of drain at 1000 each.
    assert late.desired_replicas >= math.ceil(5000.0 / 950.0) + 5
    # Asked for 290 s ago, they serve in 10 s and clear the backlog: no replica is added.
    soon = decide_replicas(
        _saturated_while_replicas_start(910.0), config, now_s=1200.0, current_replicas=8
    )
    assert (soon.desired_replicas, soon.reason) == (8, ScalingReason.HOLD_STABLE)
