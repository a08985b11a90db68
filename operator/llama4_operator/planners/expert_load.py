"""Per-expert load of one window from two readings of the serving replicas' routed-token
counters (`llama4_expert_routed_tokens_total{layer, expert}`, `layer` the model's layer index).

Counter deltas are taken per replica (metrics instance) present in both readings; a value lower
than before means the replica restarted and counts from zero again, so the delta is the current
value. A replica only in the later reading counts from the next window on. Pure: the readings
come in as plain mappings (the shapes of `serving_metrics.ServingSnapshot`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from llama4_operator.api.models import CustomArchitecture
from llama4_operator.planners.expert_placement import (
    DEFAULT_BALANCE_SLACK,
    RebalanceDecision,
    decide_rebalance,
)
from llama4_operator.planners.placement_metrics import FloatArray, Topology
from llama4_operator.planners.serving_snapshot import counter_delta

# The measured balance is mostly sampling noise on few tokens: a GPU's share of n tokens varies
# by about 1/sqrt(n), so at 200 tokens per GPU and MoE layer a uniform load still reads ~0.9.
MIN_TOKENS_PER_GPU = 200


class RoutedCounters(Protocol):
    """One replica's counters: (model layer index, expert) -> routed tokens so far."""

    @property
    def routed_tokens(self) -> Mapping[tuple[int, int], float]: ...


class CountersReading(Protocol):
    """Every replica's counters at one moment, by metrics instance."""

    @property
    def replicas(self) -> Mapping[str, RoutedCounters]: ...


def moe_layer_indices(arch: CustomArchitecture) -> list[int]:
    """Model layer indices of the MoE layers, in order: position i is MoE ordinal i (the row
    of the expert placement)."""
    return [layer for layer in range(arch.num_hidden_layers) if arch.is_moe_layer(layer)]


def routed_load(
    previous: CountersReading,
    current: CountersReading,
    moe_layers: Sequence[int],
    experts: int,
) -> FloatArray:
    """Tokens routed to each expert between the readings, [len(moe_layers), experts]. Series of
    other layers (dense ones carry none) or of unknown experts are ignored."""
    ordinal = {layer: index for index, layer in enumerate(moe_layers)}
    load = np.zeros((len(moe_layers), experts), dtype=np.float64)
    for instance, now in current.replicas.items():
        before = previous.replicas.get(instance)
        if before is None:
            continue  # a new replica: its counters start the next window
        earlier = before.routed_tokens
        for (layer, expert), value in now.routed_tokens.items():
            row = ordinal.get(layer)
            if row is None or not 0 <= expert < experts:
                continue
            load[row, expert] += counter_delta(earlier.get((layer, expert), 0.0), value)
    return load


def too_few_tokens(load: FloatArray, gpus: int, minimum_per_gpu: int = MIN_TOKENS_PER_GPU) -> str:
    """Why the window is too small to judge the balance on ('' when it is enough): fewer than
    `minimum_per_gpu` tokens per GPU in an average MoE layer."""
    layers = max(load.shape[0], 1)
    per_layer = float(load.sum()) / layers
    needed = minimum_per_gpu * gpus
    if per_layer >= needed:
        return ""
    return (
        f"{per_layer:.0f} tokens per MoE layer were routed in the window; the balance is "
        f"judged from {needed} ({minimum_per_gpu} per GPU)"
    )


def decide_on_window(
    phy2log: Sequence[Sequence[int]],
    topology: Topology,
    load: FloatArray,
    *,
    threshold: float,
    max_experts_moved: int,
    balance_slack: float = DEFAULT_BALANCE_SLACK,
) -> RebalanceDecision:
    """`decide_rebalance` for a plan as the ConfigMap holds it (lists of expert ids)."""
    current = np.asarray(phy2log, dtype=np.int64)
    return decide_rebalance(
        current,
        topology,
        load,
        threshold=threshold,
        max_experts_moved=max_experts_moved,
        balance_slack=balance_slack,
    )
