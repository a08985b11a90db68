"""Expert parallelism without a cluster: the dispatch policy and the shard's versioned weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from llama4_serving.config import ExpertPlacement
from llama4_serving.engines.reference.expert_parallel import (
    ExpertShard,
    MissingPlanVersionError,
    choose_slots,
)
from llama4_serving.engines.reference.experts import expert_ffn

PLAN = ExpertPlacement(
    nodes=2,
    gpus_per_node=2,
    slots_per_gpu=2,
    # GPU 0: experts 0,1; GPU 1: 2,3; GPU 2 (node 1): 0,2; GPU 3 (node 1): 0,3.
    phy2log=[[0, 1, 2, 3, 0, 2, 0, 3]],
)


def test_dispatch_prefers_the_same_gpu() -> None:
    slots = choose_slots(PLAN, 0, [0, 0, 0], home_gpu=0, home_node=0)
    assert slots == [0, 0, 0]


def test_dispatch_prefers_the_same_node_then_spreads_over_its_copies() -> None:
    slots = choose_slots(PLAN, 0, [0, 0, 0, 0, 2, 1], home_gpu=None, home_node=1)
    assert Counter(slots[:4]) == Counter({4: 2, 6: 2})  # expert 0's two copies on node 1
    assert slots[4] == 5  # expert 2 on node 1
    assert slots[5] == 1  # expert 1 exists only on node 0


def test_dispatch_without_a_home_balances_over_all_copies() -> None:
    slots = choose_slots(PLAN, 0, [0] * 9, home_gpu=None, home_node=None)
    assert Counter(slots) == Counter({0: 3, 4: 3, 6: 3})


def _expert_weights(experts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 8, 2 * 6, generator=generator)
    down = torch.randn(experts, 6, 8, generator=generator)
    return gate_up.numpy(), down.numpy()


def test_shard_computes_the_experts_of_its_slots() -> None:
    gate_up, down = _expert_weights()
    held = [3, 1]  # this GPU's two slots hold experts 3 and 1
    shard = ExpertShard(gpu=1, version=0, weights={0: (gate_up[held], down[held])})
    tokens = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    local_slots = np.array([0, 1, 1, 0, 1])
    out = shard.forward(0, 0, local_slots, tokens.numpy())
    for row, slot in enumerate(local_slots):
        expert = held[slot]
        expected = expert_ffn(
            tokens[row : row + 1], torch.from_numpy(gate_up[expert]), torch.from_numpy(down[expert])
        )
        np.testing.assert_allclose(out[row], expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_shard_serves_a_staged_version_and_drops_the_old_one() -> None:
    gate_up, down = _expert_weights()
    shard = ExpertShard(gpu=0, version=0, weights={0: (gate_up[[0]], down[[0]])})
    shard.stage(1, {0: (gate_up[[2]], down[[2]])})
    tokens = np.ones((1, 8), dtype=np.float32)
    old = shard.forward(0, 0, np.array([0]), tokens)
    new = shard.forward(1, 0, np.array([0]), tokens)
    assert not np.allclose(old, new)  # different experts behind the same slot
    shard.keep_only(1)
    with pytest.raises(MissingPlanVersionError, match="no plan version 0"):
        shard.forward(0, 0, np.array([0]), tokens)
    shard.ensure(0, {0: (gate_up[[0]], down[[0]])})  # what a restarted shard gets
    np.testing.assert_array_equal(shard.forward(0, 0, np.array([0]), tokens), old)
