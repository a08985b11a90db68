"""Per-expert load of a window from two readings of the routed-token counters."""

from __future__ import annotations

import numpy as np
import pytest

from llama4_operator.api.models import CustomArchitecture
from llama4_operator.planners.expert_load import moe_layer_indices, routed_load, too_few_tokens
from llama4_operator.serving_metrics import ReplicaCounters, ServingSnapshot


def reading(**replicas: dict[tuple[int, int], float]) -> ServingSnapshot:
    return ServingSnapshot(
        time_s=0.0,
        replicas={name: ReplicaCounters(routed_tokens=counts) for name, counts in replicas.items()},
    )


def test_deltas_per_replica_are_summed_per_moe_layer_and_expert() -> None:
    before = reading(a={(1, 0): 10, (1, 1): 5, (3, 1): 7}, b={(1, 0): 100})
    after = reading(a={(1, 0): 25, (1, 1): 5, (3, 1): 9}, b={(1, 0): 130, (3, 0): 4})
    load = routed_load(before, after, moe_layers=[1, 3], experts=2)
    # Row 0 is model layer 1, row 1 model layer 3; b's new series counts from zero.
    assert load.tolist() == [[15 + 30, 0], [4, 2]]


def test_a_counter_that_went_down_is_a_restart_counting_from_zero() -> None:
    before = reading(a={(0, 0): 500, (0, 1): 40})
    after = reading(a={(0, 0): 20, (0, 1): 50})
    assert routed_load(before, after, [0], 2).tolist() == [[20, 10]]


def test_replicas_in_one_reading_only_do_not_count() -> None:
    before = reading(gone={(0, 0): 5}, stays={(0, 0): 1})
    after = reading(stays={(0, 0): 3}, new={(0, 0): 1000})
    assert routed_load(before, after, [0], 1).tolist() == [[2]]


def test_dense_layers_and_unknown_experts_are_ignored() -> None:
    before = reading(a={})
    after = reading(a={(0, 0): 9, (1, 0): 3, (1, 7): 4, (1, -1): 2})
    # Only layer 1 is MoE here, with experts 0..1.
    assert routed_load(before, after, [1], 2).tolist() == [[3, 0]]


def test_moe_layers_follow_the_architecture() -> None:
    arch = CustomArchitecture(
        num_hidden_layers=6,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        num_local_experts=4,
        interleave_moe_layer_step=2,
    )
    assert moe_layer_indices(arch) == [1, 3, 5]


@pytest.mark.parametrize(
    ("tokens_per_layer", "gpus", "enough"), [(1600, 8, True), (1599, 8, False), (0, 1, False)]
)
def test_too_few_tokens_per_gpu(tokens_per_layer: int, gpus: int, enough: bool) -> None:
    load = np.full((3, 4), tokens_per_layer / 4)
    reason = too_few_tokens(load, gpus, minimum_per_gpu=200)
    assert (reason == "") is enough
    if not enough:
        assert f"judged from {200 * gpus}" in reason
