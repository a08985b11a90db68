"""Request traces for the simulator: load Azure-style CSV files, scale their rate, and make the
synthetic daily-cycle and load-step traces the benchmark uses.

A CSV trace has the columns `TIMESTAMP,ContextTokens,GeneratedTokens`; timestamps are dates
(`2023-11-16 18:17:03.9799600`) or seconds. Arrival times are shifted to start at zero.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

REQUIRED_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace file or trace option is unusable; the message names the row or field."""


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival: seconds from the start, prompt tokens, output tokens."""

    name: str
    arrival_s: FloatArray
    prompt_tokens: IntArray
    output_tokens: IntArray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise TraceError("arrival_s, prompt_tokens and output_tokens must have equal lengths")
        if n == 0:
            raise TraceError(f"trace {self.name!r} has no requests")

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1])

    @property
    def requests(self) -> int:
        return len(self.arrival_s)

    def tokens_per_minute(self, minutes: int | None = None) -> FloatArray:
        """Prompt plus output tokens arriving in each minute (the demand the oracle sees)."""
        count = minutes if minutes is not None else int(self.duration_s // 60) + 1
        bucket = np.minimum((self.arrival_s // 60).astype(np.int64), count - 1)
        weights = (self.prompt_tokens + self.output_tokens).astype(np.float64)
        return np.bincount(bucket, weights=weights, minlength=count).astype(np.float64)


def _sorted_trace(name: str, arrival: FloatArray, prompt: IntArray, output: IntArray) -> Trace:
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order]
    return Trace(name, arrival - arrival[0], prompt[order], output[order])


def _parse_timestamp(text: str, row: int) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    # Azure writes seven fractional digits; datetime accepts at most six.
    head, _, fraction = text.strip().partition(".")
    try:
        stamp = datetime.fromisoformat(head).timestamp()
    except ValueError:
        raise TraceError(
            f"row {row}: TIMESTAMP {text!r} is neither seconds nor a date like "
            "'2023-11-16 18:17:03.98'"
        ) from None
    return stamp + (float("0." + fraction) if fraction.isdigit() else 0.0)


def load_trace(path: Path | str) -> Trace:
    """Read a CSV trace; errors name the row and the column to fix."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    arrivals: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(
                f"{path.name}: missing column(s) {', '.join(missing)}; the header must be "
                f"{','.join(REQUIRED_COLUMNS)}"
            )
        for row_number, row in enumerate(reader, start=2):
            arrivals.append(_parse_timestamp(row["TIMESTAMP"], row_number))
            for column, into in (("ContextTokens", prompts), ("GeneratedTokens", outputs)):
                try:
                    value = int(row[column])
                except (TypeError, ValueError):
                    raise TraceError(
                        f"{path.name} row {row_number}: {column} {row[column]!r} is not an integer"
                    ) from None
                if value < 0:
                    raise TraceError(f"{path.name} row {row_number}: {column} must be >= 0")
                into.append(value)
    if not arrivals:
        raise TraceError(f"{path.name} has a header but no requests")
    # Every request yields at least its first token and reads at least one prompt token.
    return _sorted_trace(
        path.stem,
        np.asarray(arrivals, dtype=np.float64),
        np.maximum(np.asarray(prompts, dtype=np.int64), 1),
        np.maximum(np.asarray(outputs, dtype=np.int64), 1),
    )


def scale_rate(trace: Trace, factor: float, seed: int = 0, jitter_s: float = 60.0) -> Trace:
    """Multiply the request rate by `factor`, keeping the trace's duration and shape.

    The trace is laid over itself: `floor(factor)` copies plus a random share of one more, each
    copy shifted by its own random offset in [0, jitter_s) and wrapped inside the trace's span.
    Minute-scale rate changes and bursts survive; individual arrivals do not repeat exactly.
    """
    if not math.isfinite(factor) or factor <= 0:
        raise TraceError(f"rate scale must be a positive number, got {factor}")
    if factor == 1.0:
        return trace
    rng = np.random.default_rng(seed)
    span = max(trace.duration_s, 1e-9)
    whole = math.floor(factor)
    parts_arrival: list[FloatArray] = []
    parts_index: list[IntArray] = []
    all_rows = np.arange(trace.requests, dtype=np.int64)
    for copy in range(whole + 1):
        rows = all_rows if copy < whole else all_rows[rng.random(trace.requests) < factor - whole]
        if len(rows) == 0:
            continue
        offset = 0.0 if copy == 0 else rng.uniform(0.0, jitter_s)
        parts_arrival.append(np.mod(trace.arrival_s[rows] + offset, span))
        parts_index.append(rows)
    arrival = np.concatenate(parts_arrival)
    index = np.concatenate(parts_index)
    return _sorted_trace(
        f"{trace.name}x{factor:g}", arrival, trace.prompt_tokens[index], trace.output_tokens[index]
    )


def _arrivals_for_rate(
    rate_per_s: FloatArray, step_s: float, gamma_shape: float, rng: np.random.Generator
) -> FloatArray:
    """Arrival times of a renewal process with Gamma gaps whose rate follows `rate_per_s`.

    Gaps are drawn with mean 1 in "operational time" (the integral of the rate) and mapped back.
    """
    cumulative = np.concatenate([[0.0], np.cumsum(rate_per_s * step_s)])
    total = cumulative[-1]
    expected = int(total * 1.1) + 100
    gaps = rng.gamma(gamma_shape, 1.0 / gamma_shape, size=expected)
    operational = np.cumsum(gaps)
    while operational[-1] < total:
        more = np.cumsum(rng.gamma(gamma_shape, 1.0 / gamma_shape, size=expected))
        operational = np.concatenate([operational, operational[-1] + more])
    operational = operational[operational < total]
    times = np.arange(len(cumulative), dtype=np.float64) * step_s
    return np.asarray(np.interp(operational, cumulative, times), dtype=np.float64)


def _sample_sizes(source: Trace, count: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
    """Token lengths drawn jointly from a real trace's rows (its own quantiles)."""
    rows = rng.integers(0, source.requests, size=count)
    return source.prompt_tokens[rows], source.output_tokens[rows]


def daily_cycle_trace(
    sizes_from: Trace,
    mean_tokens_per_s: float,
    seed: int,
    hours: float = 24.0,
    peak_to_trough: float = 2.5,
    minute_noise_sigma: float = 0.15,
    gamma_shape: float = 0.84,
) -> Trace:
    """A synthetic day: rate = base x daily curve x per-minute log-normal noise, Gamma arrivals.

    Defaults follow the conversation service (2.5:1 peak to trough, Gamma shape 0.84); the
    trough is at 04:00 and the peak at 16:00.
    """
    if peak_to_trough < 1:
        raise TraceError("peak_to_trough must be >= 1")
    rng = np.random.default_rng(seed)
    minutes = int(hours * 60)
    t = np.arange(minutes, dtype=np.float64) * 60.0
    amplitude = (peak_to_trough - 1) / (peak_to_trough + 1)
    curve = 1.0 - amplitude * np.cos(2 * np.pi * (t - 4 * 3600.0) / 86400.0)
    noise = rng.lognormal(-(minute_noise_sigma**2) / 2, minute_noise_sigma, size=minutes)
    mean_request_tokens = float(np.mean(sizes_from.prompt_tokens + sizes_from.output_tokens))
    rate = mean_tokens_per_s / mean_request_tokens * curve * noise
    arrival = _arrivals_for_rate(rate, 60.0, gamma_shape, rng)
    prompt, output = _sample_sizes(sizes_from, len(arrival), rng)
    return Trace(f"daily-{sizes_from.name}", arrival, prompt, output)


def step_trace(
    sizes_from: Trace,
    base_tokens_per_s: float,
    step_factor: float,
    seed: int,
    before_s: float = 1200.0,
    after_s: float = 1200.0,
    gamma_shape: float = 0.84,
) -> Trace:
    """Steady load for `before_s`, then `step_factor` times that load for `after_s`."""
    if step_factor <= 0:
        raise TraceError("step_factor must be positive")
    rng = np.random.default_rng(seed)
    mean_request_tokens = float(np.mean(sizes_from.prompt_tokens + sizes_from.output_tokens))
    base_rate = base_tokens_per_s / mean_request_tokens
    seconds = int(before_s + after_s)
    rate = np.where(np.arange(seconds) < before_s, base_rate, base_rate * step_factor)
    arrival = _arrivals_for_rate(rate.astype(np.float64), 1.0, gamma_shape, rng)
    # Keep the first request at t=0 so that the step stays at `before_s` after re-basing.
    arrival = np.concatenate([[0.0], arrival[arrival > 0]])
    prompt, output = _sample_sizes(sizes_from, len(arrival), rng)
    return Trace(f"step{step_factor:g}x-{sizes_from.name}", arrival, prompt, output)
