"""The integer program for copies per node: worked cases where the best answer is known."""

import numpy as np

from llama4_operator.planners.node_copies import node_copies

LOOSE = 1e9


def _leaving(on_node: np.ndarray, demand: np.ndarray) -> float:
    return float(demand[on_node == 0].sum())


def test_each_node_keeps_its_own_experts_when_the_caps_allow() -> None:
    # Node 0 only asks for experts 0 and 1, node 1 for 2 and 3: each holds its own twice over.
    demand = np.array([[60.0, 0], [40, 0], [0, 70], [0, 30]])
    on_node = node_copies(demand, 2, 2, node_cap=LOOSE, copy_cap=LOOSE, time_limit=5.0)
    assert on_node is not None
    assert _leaving(on_node, demand) == 0.0
    assert on_node.sum(axis=0).tolist() == [4, 4]
    assert (on_node <= 2).all()


def test_the_cheapest_tokens_are_the_ones_that_leave() -> None:
    # Two slots per node, three experts that must all be placed: each node gives up its least
    # wanted expert, so 10 + 10 tokens leave and no fewer can.
    demand = np.array([[100.0, 10], [50, 10], [10, 100]])
    on_node = node_copies(demand, 1, 2, node_cap=LOOSE, copy_cap=LOOSE, time_limit=5.0)
    assert on_node is not None
    assert _leaving(on_node, demand) == 20.0
    assert (on_node.sum(axis=1) >= 1).all()
    assert on_node[0, 0] == 1
    assert on_node[2, 1] == 1


def test_a_copy_cap_spreads_a_hot_expert_over_enough_gpus() -> None:
    # 800 tokens at most 250 a copy: four copies on the node that asks for it, not three.
    demand = np.zeros((8, 2))
    demand[0, 0] = 800.0
    demand[1:, :] = 10.0
    on_node = node_copies(demand, 4, 2, node_cap=LOOSE, copy_cap=250.0, time_limit=5.0)
    assert on_node is not None
    assert on_node[0, 0] == 4


def test_a_node_cap_sends_some_of_a_busy_node_elsewhere() -> None:
    # Node 0 sends every token; without a cap it would hold every expert and compute them all.
    demand = np.array([[40.0, 0], [30, 0], [20, 0], [10, 0]])
    free = node_copies(demand, 2, 2, node_cap=LOOSE, copy_cap=LOOSE, time_limit=5.0)
    capped = node_copies(demand, 2, 2, node_cap=60.0, copy_cap=LOOSE, time_limit=5.0)
    assert free is not None
    assert capped is not None
    assert _leaving(free, demand) == 0.0
    # Node 0 computes at most 60 of the 100 tokens: at least 40 go to node 1.
    assert _leaving(capped, demand) >= 40.0


def test_caps_nothing_can_meet_give_none() -> None:
    demand = np.array([[100.0, 100], [1, 1]])
    assert node_copies(demand, 2, 1, node_cap=LOOSE, copy_cap=1.0, time_limit=5.0) is None
