"""Raw serving counters per replica at one moment, and the counter arithmetic on two of them.

Pure data, so that planners can turn snapshots into rates; `llama4_operator.serving_metrics`
reads them (from Prometheus or the replicas) and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReplicaCounters:
    """Raw values read from one serving replica (one metrics target / Prometheus `instance`)."""

    prompt_tokens: float = 0.0
    """llama4_prompt_tokens_total (counter)."""
    generation_tokens: float = 0.0
    """llama4_generation_tokens_total (counter)."""
    waiting_prompt_tokens: float = 0.0
    """llama4_prompt_tokens_waiting: prompt tokens queued, not yet prefilled (gauge)."""
    running_requests: float = 0.0
    """llama4_requests_running (gauge)."""
    routed_tokens: Mapping[tuple[int, int], float] = field(default_factory=dict)
    """(model layer index, expert) -> llama4_expert_routed_tokens_total."""


@dataclass(frozen=True)
class ServingSnapshot:
    """Every replica's counters at one moment."""

    time_s: float
    """time.time() when read."""
    replicas: Mapping[str, ReplicaCounters]
    """Key: instance (host:port)."""


def counter_delta(previous: float, current: float) -> float:
    """Increase of a counter; a value lower than before means the replica restarted (reset),
    so everything it counted since is the current value."""
    return current - previous if current >= previous else current


def summed_delta(
    prev: ServingSnapshot, cur: ServingSnapshot, counter: Callable[[ReplicaCounters], float]
) -> float:
    """Increase of one counter over every instance present in both snapshots (an instance seen
    only in `cur` contributes from the next pair on: its earlier count is unknown)."""
    return sum(
        counter_delta(counter(prev.replicas[instance]), counter(counters))
        for instance, counters in cur.replicas.items()
        if instance in prev.replicas
    )
