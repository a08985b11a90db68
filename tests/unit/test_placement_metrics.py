"""Judging rules for a placement, on cases small enough to follow by hand."""

import numpy as np
import pytest

from llama4_operator.planners import placement_metrics as m
from llama4_operator.planners.placement_metrics import Topology


def test_even_split_without_sources() -> None:
    # GPU 0 holds experts {0, 1}, GPU 1 holds {0, 2}. Expert 0 (4 tokens) splits 2 / 2.
    # GPU 0: 2 + 2 = 4, GPU 1: 2 + 6 = 8; balance = mean 6 / max 8.
    result = m.dispatch(np.array([[0, 1, 0, 2]]), Topology(2, 1, 2), np.array([[4.0, 2, 6]]))
    assert result.gpu_load.tolist() == [[4.0, 8.0]]
    assert m.balance(result.gpu_load) == pytest.approx(0.75)


def test_sources_keep_tokens_on_their_gpu_else_cross_nodes() -> None:
    # Same placement; GPU 0 sends 4 tokens to expert 0 and 6 to expert 2, GPU 1 sends 2 to expert 1.
    # Expert 0's tokens stay on GPU 0 (local copy). Expert 2 has no copy on node 0: all 6 go to
    # GPU 1. Expert 1 has no copy on node 1: the 2 go to GPU 0. Loads 6 / 6, 8 tokens cross;
    # each node sends or receives 8.
    source = np.array([[[4.0, 0, 6], [0, 2, 0]]])
    load = source.sum(axis=1)
    topology = Topology(2, 1, 2)
    phy2log = np.array([[0, 1, 0, 2]])
    result = m.dispatch(phy2log, topology, load, source)
    assert result.gpu_load.tolist() == [[6.0, 6.0]]
    assert result.cross_node_tokens.tolist() == [8.0]
    assert result.node_cross_tokens.tolist() == [[8.0, 8.0]]
    figures = m.evaluate(phy2log, topology, load, source_load=source, token_bytes=10)
    assert figures.cross_node_bytes == 8 * 2 * 10  # dispatch and combine
    assert figures.busiest_node_cross_bytes == 8 * 2 * 10
    assert figures.balance == pytest.approx(1.0)


def test_tokens_without_a_local_copy_split_over_their_node() -> None:
    # One node, 3 GPUs, one slot each: experts [0, 0, 1]. GPU 2 sends 6 tokens to expert 0: no
    # copy on GPU 2, two on its node -> 3 and 3. GPU 0 sends 2 to expert 0 (stays) and 1 to
    # expert 1 (to GPU 2). Loads 5, 3, 1.
    source = np.array([[[2.0, 1], [0, 0], [6, 0]]])
    result = m.dispatch(np.array([[0, 0, 1]]), Topology(1, 3, 1), source.sum(axis=1), source)
    assert result.gpu_load.tolist() == [[5.0, 3.0, 1.0]]
    assert result.cross_node_tokens.tolist() == [0.0]


def test_cross_node_without_sources_assumes_tokens_from_every_gpu_alike() -> None:
    # Node 0 holds expert 0, node 1 holds expert 1. Half of each expert's tokens come from the
    # other node: 2 of expert 0's 4 and 1 of expert 1's 2 cross.
    result = m.dispatch(np.array([[0, 1]]), Topology(2, 1, 1), np.array([[4.0, 2]]))
    assert result.cross_node_tokens.tolist() == [3.0]


def test_model_balance_is_sum_of_means_over_sum_of_maxes() -> None:
    gpu_load = np.array([[1.0, 3.0], [2.0, 2.0]])
    # means 2 and 2, maxes 3 and 2.
    assert m.balance(gpu_load) == pytest.approx(4 / 5)
    assert m.layer_balance(gpu_load).tolist() == pytest.approx([2 / 3, 1.0])


def test_experts_moved_counts_copies_a_gpu_must_load() -> None:
    topology = Topology(1, 2, 2)
    previous = np.array([[0, 1, 2, 3]])
    # Reordering inside GPU 0 loads nothing, though two slots changed.
    reordered = np.array([[1, 0, 2, 3]])
    assert m.experts_moved(previous, reordered, topology) == 0
    assert m.slots_changed(previous, reordered) == 2
    # Swapping experts 1 and 2 between GPUs loads one copy on each GPU.
    swapped = np.array([[0, 2, 1, 3]])
    assert m.experts_moved(previous, swapped, topology) == 2
    assert m.bytes_moved(previous, swapped, topology, np.array([10, 20, 30, 40])) == 30 + 20


def test_max_gpu_expert_bytes_sums_layers() -> None:
    topology = Topology(1, 2, 1)
    phy2log = np.array([[0, 1], [1, 0]])
    # GPU 0 holds experts 0 and 1 (one per layer): 5 + 7; GPU 1 the same.
    assert m.max_gpu_expert_bytes(phy2log, topology, np.array([5, 7])) == 12
    assert m.max_gpu_expert_bytes(phy2log, topology, 100) == 200


def test_placement_missing_an_expert_is_refused() -> None:
    with pytest.raises(ValueError, match=r"phy2log\[0\] holds no copy of expert 2"):
        m.dispatch(np.array([[0, 1]]), Topology(1, 2, 1), np.array([[1.0, 1, 1]]))


def test_topology_refuses_zero_sizes() -> None:
    with pytest.raises(ValueError, match="slots_per_gpu"):
        Topology(1, 8, 0)
