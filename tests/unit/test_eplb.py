"""EPLB baseline, checked on small cases whose greedy result is worked out by hand."""

import numpy as np
import pytest

from llama4_operator.planners import eplb
from llama4_operator.planners.placement_metrics import Topology


def test_balanced_packing_heaviest_first_onto_lightest_open_pack() -> None:
    # Weights [5, 3, 3, 1, 5, 3] onto 2 packs of 3 items. Heaviest first, ties by index:
    # item 0 (5) -> pack 0 (0 vs 0, first)      loads 5 / 0
    # item 4 (5) -> pack 1                      loads 5 / 5
    # item 1 (3) -> pack 0 (tie, first)        loads 8 / 5
    # item 2 (3) -> pack 1                      loads 8 / 8
    # item 5 (3) -> pack 0 (tie), now full      loads 11 / 8
    # item 3 (1) -> pack 1 (only open pack)     loads 11 / 9
    pack, rank = eplb.balanced_packing(np.array([5.0, 3, 3, 1, 5, 3]), 2)
    assert pack.tolist() == [0, 0, 1, 1, 1, 0]
    assert rank.tolist() == [0, 1, 1, 2, 0, 2]


def test_balanced_packing_needs_items_divisible_by_packs() -> None:
    with pytest.raises(ValueError, match="split evenly"):
        eplb.balanced_packing(np.array([1.0, 2, 3]), 2)


def test_replicate_hands_spare_copies_to_highest_load_per_copy() -> None:
    # Loads [10, 6, 3, 1], 6 slots: per copy 10 6 3 1 -> expert 0 gets a copy (5 6 3 1)
    # -> expert 1 gets one (5 3 3 1). Copies [2, 2, 1, 1]; physical list: experts, then spares.
    phy_to_log, counts = eplb.replicate(np.array([10.0, 6, 3, 1]), 6)
    assert phy_to_log.tolist() == [0, 1, 2, 3, 0, 1]
    assert counts.tolist() == [2, 2, 1, 1]


def test_global_policy_by_hand() -> None:
    # Copies from the replicate case weigh [5, 3, 3, 1, 5, 3]; packing them onto 2 GPUs of 3 slots
    # is the packing case above: GPU 0 gets copies 0, 1, 5 = experts 0, 1, 1 (load 11),
    # GPU 1 gets copies 4, 2, 3 = experts 0, 2, 3 (load 9). Expert 1 has both copies on GPU 0:
    # the global policy does not keep copies apart.
    phy2log = eplb.global_policy(np.array([[10.0, 6, 3, 1]]), Topology(1, 2, 3))
    assert phy2log.tolist() == [[0, 1, 1, 0, 2, 3]]


def test_hierarchical_policy_by_hand() -> None:
    # 2 nodes x 2 GPUs x 2 slots, loads [10, 6, 3, 1].
    # Experts onto nodes (2 each): 0 -> node 0 (10), 1 -> node 1 (6), 2 -> node 1 (9, full),
    # 3 -> node 0 (11). Node 0 holds experts [0, 3], node 1 holds [1, 2].
    # Node 0, 4 slots, loads [10, 1]: spares to expert 0 twice (5 > 1, 3.33 > 1): copies [3, 1],
    #   copy weights [3.33, 1, 3.33, 3.33] for local copies [0, 3, 0, 0]. Packing onto 2 GPUs:
    #   copy 0 -> GPU 0, copy 2 -> GPU 1, copy 3 -> GPU 0 (tie; full), copy 1 -> GPU 1.
    #   GPU 0 = [0, 0], GPU 1 = [0, 3].
    # Node 1, loads [6, 3]: spare to expert 1 (6 > 3), then per copy [3, 3]: tie -> expert 1 again.
    #   Copies [3, 1], weights [2, 3, 2, 2] for [1, 2, 1, 1]. Packing: copy 1 (3) -> GPU 0,
    #   copy 0 -> GPU 1, copy 2 -> GPU 1 (2 < 3; full), copy 3 -> GPU 0.
    #   GPU 0 = [2, 1], GPU 1 = [1, 1].
    phy2log = eplb.hierarchical_policy(np.array([[10.0, 6, 3, 1]]), Topology(2, 2, 2))
    assert phy2log.tolist() == [[0, 0, 0, 3, 2, 1, 1, 1]]


def test_hierarchical_policy_refuses_experts_not_divisible_by_nodes() -> None:
    with pytest.raises(ValueError, match="global policy"):
        eplb.hierarchical_policy(np.ones((1, 3)), Topology(2, 1, 2))


def test_policies_plan_each_layer_on_its_own() -> None:
    load = np.array([[10.0, 6, 3, 1], [1, 3, 6, 10]])
    both = eplb.global_policy(load, Topology(1, 2, 3))
    second_alone = eplb.global_policy(load[1:], Topology(1, 2, 3))
    assert both[1].tolist() == second_alone[0].tolist()
