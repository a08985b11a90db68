"""C*, the tokens/s one replica sustains within the SLO, measured on the replica model itself.

One always-ready replica receives Poisson arrivals whose token lengths are drawn from the trace;
the highest rate at which at least `target_attainment` of requests meet both TTFT and TPOT is
found by doubling and then bisection, and reported as prompt plus output tokens per second.
"""

from __future__ import annotations

import numpy as np

from llama4_operator.simulator.engine import ARRIVAL, FINISH, FIRST_TOKEN, OUTPUT, ClusterEngine
from llama4_operator.simulator.model import ReplicaModel
from llama4_operator.simulator.traces import Trace


def _attainment(
    sizes_from: Trace,
    model: ReplicaModel,
    rate_per_s: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    probe_s: float,
    seed: int,
) -> float:
    rng = np.random.default_rng(seed)
    count = max(2, int(rate_per_s * probe_s))
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, size=count))
    rows = rng.integers(0, sizes_from.requests, size=count)
    probe = Trace(
        "capacity-probe", arrival, sizes_from.prompt_tokens[rows], sizes_from.output_tokens[rows]
    )
    engine = ClusterEngine(probe, model, max_replicas=1, seed=seed)
    engine.add_replica(0.0)
    engine.advance(float(arrival[-1]) + 120.0)
    times = engine.req_time
    # Judge the second half only: the first fills the batch from empty.
    keep = times[:, ARRIVAL] >= arrival[-1] / 2
    first = np.nan_to_num(times[keep, FIRST_TOKEN], nan=np.inf)
    finish = np.nan_to_num(times[keep, FINISH], nan=np.inf)
    output = engine.req_tok[keep, OUTPUT].astype(np.float64)
    ttft = first - times[keep, ARRIVAL]
    with np.errstate(invalid="ignore"):  # unfinished requests: inf - inf, judged a miss below
        tpot = np.where(output > 1, (finish - first) / np.maximum(output - 1, 1), 0.0)
    met = (first >= 0) & (ttft <= ttft_slo_s) & np.isfinite(finish) & (tpot <= tpot_slo_s)
    return float(met.mean())


def calibrate_replica_capacity(
    sizes_from: Trace,
    model: ReplicaModel,
    ttft_slo_s: float,
    tpot_slo_s: float,
    target_attainment: float = 0.95,
    probe_s: float = 900.0,
    seed: int = 0,
    bisections: int = 8,
) -> float:
    """Tokens/s (prompt plus output) one replica serves with `target_attainment` SLO attainment."""
    if not 0 < target_attainment < 1:
        raise ValueError("target_attainment must be between 0 and 1")

    def meets(rate: float) -> bool:
        attained = _attainment(sizes_from, model, rate, ttft_slo_s, tpot_slo_s, probe_s, seed)
        return attained >= target_attainment

    low, high = 0.0, 0.5
    while meets(high):
        low, high = high, high * 2
        if high > 1e5:
            raise ValueError("the replica model never saturates; check its cost numbers")
    if low == 0.0 and not meets(high / 64):
        raise ValueError(
            "one replica cannot meet the SLO even at a trickle of requests: relax --ttft-slo / "
            "--tpot-slo or check the replica model"
        )
    for _ in range(bisections):
        middle = (low + high) / 2
        if meets(middle):
            low = middle
        else:
            high = middle
    mean_tokens = float(np.mean(sizes_from.prompt_tokens + sizes_from.output_tokens))
    return low * mean_tokens
