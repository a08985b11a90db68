"""The `token` autoscaling policy: desired replicas from a history of token-throughput samples.

Pure: the caller (the operator's timer, or the simulator) keeps the samples and the time of the
last scale-up; `decide_replicas` turns them into one `ScalingDecision` with a `ScalingReason`
that goes into status, events and the `reason` label of the decision metric.

How it decides, in order:
1. No samples, or the newest is older than `stale_after_s`, or no replica reports while some
   should: hold the current count (`hold_metrics_stale`). Missing data never scales anything down.
2. Load per replica is measured in tokens/s (prompt + generated). The per-replica target is
   `capacity x target_utilization`; capacity is set, or calibrated from the throughput replicas
   reached while a backlog kept them saturated (`calibrate_capacity`). When more than
   `saturation_queue_s` of work stays queued for `saturation_window_s`, every batch slot is busy
   and the rate each ready replica serves is what it sustains for the current mix of prompt and
   output lengths: if lower than the set capacity, it replaces it (`saturated_capacities`), now
   for scaling up and over the scale-down window for scaling down.
3. Up, fast: demand = tokens/s arriving (served plus the backlog's growth, so that neither
   saturation nor a draining backlog hides it) over `burst_window_s`, plus the trend of the
   last `trend_window_s` projected `cold_start_s` ahead (at most `max_trend_gain` of the
   current rate); over 10 minutes, minute-to-minute noise mostly cancels out of the slope.
   While the backlog grows at every sample of `surge_window_s`, the mean over that
   shorter window counts if higher, so a step is seen in seconds. Replicas asked for now serve
   only after the cold start, so the backlog to clear then is what waits now less what the
   replicas asked for clear meanwhile (or plus what they fall short by), at the
   `burst_window_s` rate: a few seconds of surge are not projected over minutes. While a
   backlog grows with every batch slot busy, replicas still starting count only from the end
   of their own cold start, and the ready ones' shortfall is taken at the lower of the
   `burst_window_s` and `scale_up_confirm_window_s` rates. Extra replicas, counted at full
   capacity, drain it within `backlog_drain_s` of becoming ready (at most `max_drain_gain` x
   the arriving rate). When demand exceeds `scale_up_utilization` of the live replicas'
   capacity (ready or starting), it scales up at once, in one step, to the count that puts
   the arriving rate at `target_utilization` plus the drain replicas. A scale-up only the
   trend calls for (the arriving rate fits, no queue of `saturation_queue_s` or growing) needs
   the trend on top of the `scale_up_confirm_window_s` rate to exceed it too, so a half-minute
   swing does not undo a scale-down.
4. Down, slow: only the highest one-minute arrival rate over `scale_down_window_s` (by default
   the longer of 10 minutes and twice the cold start) counts, at `scale_down_utilization`, with
   no backlog, and not within `scale_down_cooldown_s` of the last scale-up. A replica given back
   costs a full cold start to get back.
5. The result is clamped to [min_replicas, max_replicas] (`clamp_min`, `clamp_max`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class ScalingReason(StrEnum):
    """Why the policy chose its replica count; stable strings for status, events and metrics."""

    SCALE_UP_BURST = "scale_up_burst"
    SCALE_FROM_ZERO = "scale_from_zero"
    SCALE_UP_TREND = "scale_up_trend"
    SCALE_DOWN_LULL = "scale_down_lull"
    HOLD_STABLE = "hold_stable"
    HOLD_METRICS_STALE = "hold_metrics_stale"
    HOLD_COOLDOWN = "hold_cooldown"
    CLAMP_MIN = "clamp_min"
    CLAMP_MAX = "clamp_max"


@dataclass(frozen=True)
class MetricSample:
    """Serving metrics of the whole deployment over the few seconds ending at `time_s`."""

    time_s: float
    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    waiting_tokens: float
    ready_replicas: int
    current_replicas: int

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens_per_s + self.generated_tokens_per_s


@dataclass(frozen=True)
class TokenPolicyConfig:
    """Settings of the `token` policy; every default is a starting point, not a tuned value."""

    capacity_tokens_per_s: float
    """Tokens/s one replica sustains within its SLO (set, or a first guess when calibrating)."""
    min_replicas: int = 1
    max_replicas: int = 64
    scale_up_utilization: float = 1.0
    target_utilization: float = 0.95
    scale_down_utilization: float = 0.95
    cold_start_s: float = 300.0
    burst_window_s: float = 30.0
    surge_window_s: float = 10.0
    trend_window_s: float = 600.0
    max_trend_gain: float = 0.25
    backlog_drain_s: float = 30.0
    scale_down_window_s: float | None = None
    scale_down_cooldown_s: float = 600.0
    stale_after_s: float = 60.0
    calibrate: bool = False
    backlog_saturation_tokens: float = 1.0
    saturation_queue_s: float = 1.0
    """Queued work, in seconds of the served rate, above which the replicas count as saturated."""
    saturation_window_s: float = 15.0
    """How long saturation must last before its measured throughput replaces the capacity."""
    max_drain_gain: float = 1.0
    """Replicas added to drain a backlog: at most this share of the arriving rate's need."""
    scale_up_confirm_window_s: float = 60.0
    """A scale-up only the trend calls for needs the trend on this window's rate too."""

    def __post_init__(self) -> None:
        if not self.capacity_tokens_per_s > 0:
            raise ValueError("capacity_tokens_per_s must be positive: tokens/s one replica serves")
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if not (
            0
            < self.scale_down_utilization
            <= self.target_utilization
            <= self.scale_up_utilization
            <= 1
        ):
            raise ValueError(
                "need 0 < scale_down_utilization <= target_utilization <= scale_up_utilization <= 1"
            )
        for name in (
            "burst_window_s",
            "surge_window_s",
            "trend_window_s",
            "backlog_drain_s",
            "stale_after_s",
            "saturation_queue_s",
            "scale_up_confirm_window_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in (
            "cold_start_s",
            "scale_down_window_s",
            "scale_down_cooldown_s",
            "max_trend_gain",
            "saturation_window_s",
            "max_drain_gain",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def effective_scale_down_window_s(self) -> float:
        if self.scale_down_window_s is not None:
            return self.scale_down_window_s
        return max(600.0, 2.0 * self.cold_start_s)


@dataclass(frozen=True)
class ScalingDecision:
    """The policy's answer: replicas to run, why, and the numbers behind it."""

    desired_replicas: int
    reason: ScalingReason
    demand_tokens_per_s: float
    capacity_tokens_per_s: float
    message: str


def calibrate_capacity(samples: Sequence[MetricSample], saturation_tokens: float) -> float | None:
    """Per-replica tokens/s seen while a backlog kept every ready replica busy (saturated).

    The median over saturated samples resists one odd scrape; None when none was saturated.
    """
    saturated = [
        s.tokens_per_s / s.ready_replicas
        for s in samples
        if s.ready_replicas > 0 and s.waiting_tokens >= saturation_tokens and s.tokens_per_s > 0
    ]
    if len(saturated) < 3:
        return None
    return statistics.median(saturated)


def _queue_delay_s(sample: MetricSample) -> float:
    """Seconds of work waiting at the rate the replicas serve now."""
    if sample.waiting_tokens <= 0:
        return 0.0
    if sample.tokens_per_s <= 0:
        return math.inf
    return sample.waiting_tokens / sample.tokens_per_s


def saturated_capacities(
    samples: Sequence[MetricSample], config: TokenPolicyConfig
) -> list[tuple[float, float]]:
    """(end time, tokens/s per ready replica) of each saturation episode in `samples`.

    An episode is a run of samples with more than `saturation_queue_s` of work queued, lasting
    at least `saturation_window_s`. While requests queue every batch slot is busy, so the rate
    each ready replica serves is what it sustains for the current mix of prompt and output
    lengths, which can be below the set capacity (long outputs fill the slots sooner).
    """
    episodes: list[tuple[float, float]] = []
    run: list[MetricSample] = []
    for sample in (*samples, None):
        if (
            sample is not None
            and sample.ready_replicas > 0
            and _queue_delay_s(sample) >= config.saturation_queue_s
        ):
            run.append(sample)
            continue
        if len(run) >= 2 and run[-1].time_s - run[0].time_s >= config.saturation_window_s:
            per_replica = statistics.median(s.tokens_per_s / s.ready_replicas for s in run)
            episodes.append((run[-1].time_s, per_replica))
        run = []
    return episodes


def _arrival_rates(samples: Sequence[MetricSample]) -> list[tuple[float, float]]:
    """(time, tokens/s arriving) per sample: served tokens plus the growth of the backlog.

    Served throughput alone hides demand while replicas are saturated and shows a false rise
    while a backlog drains; adding the backlog's change removes both.
    """
    rates: list[tuple[float, float]] = []
    for i, sample in enumerate(samples):
        rate = sample.tokens_per_s
        if i > 0:
            elapsed = sample.time_s - samples[i - 1].time_s
            if elapsed > 0:
                rate += (sample.waiting_tokens - samples[i - 1].waiting_tokens) / elapsed
        rates.append((sample.time_s, max(rate, 0.0)))
    return rates


def _backlog_keeps_growing(samples: Sequence[MetricSample], seconds: float) -> bool:
    """True when waiting tokens rose at every sample of the last `seconds` (not one spike)."""
    recent = [s for s in samples if s.time_s > samples[-1].time_s - seconds]
    earlier = samples[-len(recent) - 1 : -len(recent)] if len(samples) > len(recent) else []
    series = [s.waiting_tokens for s in (*earlier, *recent)]
    return len(series) >= 3 and all(b > a for a, b in itertools.pairwise(series))


def _window(
    rates: Sequence[tuple[float, float]], now_s: float, seconds: float
) -> list[tuple[float, float]]:
    return [(t, r) for t, r in rates if now_s - seconds < t <= now_s]


def _mean(rates: Sequence[tuple[float, float]]) -> float:
    return sum(r for _, r in rates) / len(rates) if rates else 0.0


def _trend_per_s(rates: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of the rate against time, in tokens/s per second."""
    if len(rates) < 3:
        return 0.0
    mean_t = sum(t for t, _ in rates) / len(rates)
    mean_y = _mean(rates)
    spread = sum((t - mean_t) ** 2 for t, _ in rates)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (r - mean_y) for t, r in rates) / spread


def _peak_minute_rate(rates: Sequence[tuple[float, float]]) -> float:
    """Highest one-minute mean rate among `rates` (sorted by time)."""
    peak = 0.0
    start = 0
    total = 0.0
    for end, (t, r) in enumerate(rates):
        total += r
        while rates[start][0] <= t - 60.0:
            total -= rates[start][1]
            start += 1
        peak = max(peak, total / (end - start + 1))
    return peak


def _starting_replica_seconds(
    samples: Sequence[MetricSample], now_s: float, cold_start_s: float, starting: int
) -> float:
    """Replica-seconds the `starting` replicas serve within the next cold start.

    They are the ones asked for last: each serves from when it was asked plus the cold start
    (read from the rises of `current_replicas` in the samples; one not found there counts as
    asked now), so a backlog is not assumed cleared by replicas still loading.
    """
    served_s = 0.0
    left = starting
    for i in range(len(samples) - 1, 0, -1):
        if left <= 0:
            break
        # A rise between two samples was decided at the older one.
        added = min(samples[i].current_replicas - samples[i - 1].current_replicas, left)
        if added > 0:
            asked_s = samples[i - 1].time_s
            served_s += added * max(cold_start_s - max(asked_s + cold_start_s - now_s, 0.0), 0.0)
            left -= added
    return served_s


def _spare_tokens_until_ready(
    samples: Sequence[MetricSample],
    cold_start_s: float,
    now_s: float,
    current_replicas: int,
    capacity: float,
    rate: float,
    starting_late: bool,
) -> float:
    """Tokens the replicas asked for serve beyond `rate` within the next cold start (negative:
    what they fall short by). With `starting_late`, replicas still starting serve only from
    the end of their own cold start; otherwise every replica asked for counts from now."""
    if not starting_late:
        return (capacity * current_replicas - rate) * cold_start_s
    ready = min(samples[-1].ready_replicas, current_replicas)
    starting_s = _starting_replica_seconds(samples, now_s, cold_start_s, current_replicas - ready)
    return (capacity * ready - rate) * cold_start_s + capacity * starting_s


def _drain_rate(
    samples: Sequence[MetricSample],
    config: TokenPolicyConfig,
    now_s: float,
    current_replicas: int,
    capacity: float,
    rate: float,
    starting_late: bool,
    arriving: float,
) -> float:
    """Tokens/s of extra replicas that drain, within `backlog_drain_s` of becoming ready, the
    backlog left when a replica asked for now is ready, with `rate` arriving meanwhile (at
    most `max_drain_gain` x `arriving`)."""
    spare = _spare_tokens_until_ready(
        samples, config.cold_start_s, now_s, current_replicas, capacity, rate, starting_late
    )
    backlog_at_ready = max(samples[-1].waiting_tokens - spare, 0.0)
    return min(backlog_at_ready / config.backlog_drain_s, config.max_drain_gain * arriving)


def _clamp(
    desired: int,
    reason: ScalingReason,
    config: TokenPolicyConfig,
    demand: float,
    capacity: float,
    message: str,
) -> ScalingDecision:
    if desired < config.min_replicas:
        return ScalingDecision(
            config.min_replicas,
            ScalingReason.CLAMP_MIN,
            demand,
            capacity,
            f"{message}; raised to min_replicas={config.min_replicas}",
        )
    if desired > config.max_replicas:
        return ScalingDecision(
            config.max_replicas,
            ScalingReason.CLAMP_MAX,
            demand,
            capacity,
            f"{message}; capped at max_replicas={config.max_replicas}",
        )
    return ScalingDecision(desired, reason, demand, capacity, message)


def decide_replicas(
    samples: Sequence[MetricSample],
    config: TokenPolicyConfig,
    now_s: float,
    current_replicas: int,
    last_scale_up_s: float | None = None,
) -> ScalingDecision:
    """Desired replicas for the deployment now.

    samples: oldest first, covering at least the scale-down window for scale-downs to happen.
    current_replicas: replicas asked for now (ready plus starting).
    last_scale_up_s: when the replica count last went up (None: not recently).
    """
    capacity = config.capacity_tokens_per_s
    if config.calibrate:
        calibrated = calibrate_capacity(samples, config.backlog_saturation_tokens)
        if calibrated is not None:
            capacity = calibrated
    hold = current_replicas
    latest = samples[-1] if samples else None
    if latest is None or now_s - latest.time_s > config.stale_after_s:
        age = "no samples" if latest is None else f"newest sample {now_s - latest.time_s:.0f}s old"
        return _clamp(
            hold,
            ScalingReason.HOLD_METRICS_STALE,
            config,
            0.0,
            capacity,
            f"holding {hold}: {age}",
        )
    if latest.ready_replicas == 0 and current_replicas > 0 and latest.tokens_per_s == 0:
        # Nothing reports yet (replicas starting or scrapes failing): zero is not a measurement.
        return _clamp(
            hold,
            ScalingReason.HOLD_METRICS_STALE,
            config,
            0.0,
            capacity,
            f"holding {hold}: no ready replica reports metrics",
        )

    episodes = saturated_capacities(samples, config)
    # A saturation going on now, or seen within the scale-down window, shows what a replica
    # serves for the current mix when that is less than the set capacity.
    capacity_up = capacity
    saturated_now = bool(episodes) and episodes[-1][0] >= latest.time_s
    if saturated_now:
        capacity_up = min(capacity, episodes[-1][1])
    down_window = config.effective_scale_down_window_s
    recent = [c for t, c in episodes if t > now_s - down_window]
    capacity_down = min([capacity, *recent])

    per_replica_trigger = capacity_up * config.scale_up_utilization
    per_replica_up = capacity_up * config.target_utilization
    rates = _arrival_rates(samples)
    arriving = _mean(_window(rates, now_s, config.burst_window_s))
    surging = _backlog_keeps_growing(samples, config.surge_window_s)
    if surging:
        # A surge: the short window shows the new level before the long one catches up.
        arriving = max(arriving, _mean(_window(rates, now_s, config.surge_window_s)))
    trend = _trend_per_s(_window(rates, now_s, config.trend_window_s))
    gain = min(max(trend, 0.0) * config.cold_start_s, config.max_trend_gain * arriving)
    # Replicas asked for now serve only after the cold start. Until then the replicas asked
    # for work on the backlog with their spare capacity (negative: they fall short), so a
    # backlog they clear before a new replica could start needs none. The rate is the burst
    # window's, not the surge's: ten seconds of burst do not last minutes. Extra replicas
    # drain what remains within `backlog_drain_s` of becoming ready (at most
    # `max_drain_gain` of the arriving rate).
    sustained = _mean(_window(rates, now_s, config.burst_window_s))
    confirmed_rate = _mean(_window(rates, now_s, config.scale_up_confirm_window_s))
    # While a backlog grows with every slot busy, replicas still starting count from the end
    # of their cold start, and a half-minute swing is not projected over a long cold start.
    starting_late = saturated_now and surging
    drain_rate = _drain_rate(
        samples,
        config,
        now_s,
        current_replicas,
        capacity_up,
        min(sustained, confirmed_rate) if starting_late else sustained,
        starting_late,
        arriving,
    )
    projected = arriving + gain + drain_rate
    live_capacity = per_replica_trigger * current_replicas
    short_now = arriving + drain_rate > live_capacity
    short_ahead = projected > live_capacity
    # A scale-up the trend calls for while the arriving rate fits and no queue builds needs
    # the trend on top of the confirmation window's rate (the resolution scale-downs are
    # judged at) too: a half-minute swing would otherwise add a replica just given back.
    unconfirmed = (
        short_ahead
        and not short_now
        and not (surging or _queue_delay_s(latest) >= config.saturation_queue_s)
        and confirmed_rate + gain + drain_rate <= live_capacity
    )
    sized = max(
        math.ceil((arriving + gain) / per_replica_up + drain_rate / capacity_up - 1e-9),
        current_replicas + 1,
    )
    if short_ahead and not unconfirmed:
        reason = ScalingReason.SCALE_UP_BURST if short_now else ScalingReason.SCALE_UP_TREND
        return _clamp(
            sized,
            reason,
            config,
            projected,
            capacity_up,
            f"demand {projected:.0f} tokens/s (backlog {latest.waiting_tokens:.0f} tokens) needs "
            f"{sized} replicas at {per_replica_up:.0f} tokens/s each",
        )

    peak = _peak_minute_rate(_window(rates, now_s, down_window))
    per_replica_down = capacity_down * config.scale_down_utilization
    needed_down = max(
        math.ceil(peak / per_replica_down - 1e-9),
        math.ceil((arriving + gain) / per_replica_up - 1e-9),
    )
    # Only a history that spans the whole window may justify giving a replica back.
    covered = samples[0].time_s <= now_s - down_window + config.burst_window_s
    if needed_down < current_replicas and covered and latest.waiting_tokens == 0:
        if last_scale_up_s is not None and now_s - last_scale_up_s <= config.scale_down_cooldown_s:
            return _clamp(
                current_replicas,
                ScalingReason.HOLD_COOLDOWN,
                config,
                peak,
                capacity_down,
                f"holding {current_replicas}: scaled up {now_s - last_scale_up_s:.0f}s ago",
            )
        return _clamp(
            needed_down,
            ScalingReason.SCALE_DOWN_LULL,
            config,
            peak,
            capacity_down,
            f"peak {peak:.0f} tokens/s over {down_window:.0f}s needs {needed_down} replicas at "
            f"{per_replica_down:.0f} tokens/s each",
        )
    return _clamp(
        current_replicas,
        ScalingReason.HOLD_STABLE,
        config,
        projected,
        capacity_up,
        f"holding {current_replicas}: demand {projected:.0f} tokens/s "
        + (
            f"within target over {config.scale_up_confirm_window_s:.0f}s and no queue"
            if unconfirmed
            else "within target"
        ),
    )
