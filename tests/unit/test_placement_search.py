"""The compiled kernels of the expert planner agree with the reference code they stand in for."""

import numpy as np
import pytest

from llama4_operator.planners import eplb, placement_search
from llama4_operator.planners import placement_metrics as m
from llama4_operator.planners.placement_metrics import Topology

SHAPES = [Topology(1, 8, 3), Topology(2, 8, 9), Topology(4, 8, 5)]


def _layer(topology: Topology, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random placement of 128 experts (each at least once) with per-source token counts."""
    rng = np.random.default_rng(seed)
    experts = 128 if topology.slots >= 128 else 16
    row = np.concatenate([np.arange(experts), rng.integers(0, experts, topology.slots - experts)])
    phy2log = rng.permutation(row)[None].astype(np.int64)
    source = rng.integers(0, 50, (1, topology.gpus, experts)).astype(np.float64)
    # Some experts get no tokens from some nodes, so every branch of the rule is taken.
    source[:, : topology.gpus_per_node, : experts // 4] = 0.0
    return phy2log, source, source.sum(axis=1)


@pytest.mark.parametrize("topology", SHAPES)
@pytest.mark.parametrize("with_sources", [True, False])
def test_layer_dispatch_matches_the_metrics_rule(topology: Topology, with_sources: bool) -> None:
    phy2log, source, load = _layer(topology, seed=topology.gpus)
    experts = load.shape[1]
    copies = m.copies_per_gpu(phy2log, topology, experts)[0]
    gpu_load, cross = placement_search.layer_dispatch(
        copies,
        np.ascontiguousarray(source[0].T) if with_sources else np.zeros((1, 1)),
        load[0],
        with_sources,
        topology.node_of_gpu(),
        topology.nodes,
    )
    expected = m.dispatch(phy2log, topology, load, source if with_sources else None)
    np.testing.assert_allclose(gpu_load, expected.gpu_load[0], rtol=1e-12)
    if with_sources:
        assert cross == pytest.approx(float(expected.cross_node_tokens[0]), rel=1e-12)


@pytest.mark.parametrize("topology", [Topology(2, 8, 9), Topology(4, 8, 6), Topology(4, 8, 4)])
def test_hierarchical_start_is_eplb_hierarchical(topology: Topology) -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        load = rng.integers(0, 2000, (1, 128)).astype(np.float64)
        expected = eplb.hierarchical_policy(load, topology)[0]
        got = placement_search.hierarchical_start(
            load[0], topology.nodes, topology.gpus_per_node, topology.slots_per_gpu
        )
        np.testing.assert_array_equal(got.ravel(), expected)


def test_local_search_lowers_the_peak_and_keeps_the_bookkeeping_true() -> None:
    topology = Topology(4, 8, 6)
    phy2log, source, load = _layer(topology, seed=3)
    slots = phy2log[0].reshape(topology.gpus, topology.slots_per_gpu).copy()
    copies = m.copies_per_gpu(phy2log, topology, load.shape[1])[0].copy()
    before = m.dispatch(phy2log, topology, load, source).gpu_load[0].max()
    moves, peak, cross = placement_search.local_search(
        slots,
        copies,
        np.ascontiguousarray(source[0].T),
        load[0],
        True,
        topology.node_of_gpu(),
        topology.nodes,
        0.0,
        40,
        1e18,
        True,
        200,
        16,
    )
    after = m.dispatch(slots.reshape(1, -1), topology, load, source)
    assert 0 < moves <= 40
    assert peak < before
    # The search's running figures are the exact dispatch of where it ended.
    assert peak == pytest.approx(float(after.gpu_load[0].max()), rel=1e-9)
    assert cross == pytest.approx(float(after.cross_node_tokens[0]), rel=1e-9)
    np.testing.assert_array_equal(copies, m.copies_per_gpu(slots.reshape(1, -1), topology, 128)[0])


@pytest.mark.parametrize("topology", SHAPES)
def test_drifted_peak_is_the_mean_busiest_share_over_the_windows(topology: Topology) -> None:
    phy2log, source, load = _layer(topology, seed=topology.gpus + 1)
    experts = load.shape[1]
    rng = np.random.default_rng(5)
    factor = np.exp(0.3 * rng.standard_normal((6, experts, topology.nodes)))
    drifted = np.ascontiguousarray(source[0].T[None] * factor[:, :, topology.node_of_gpu()])
    node_tokens = np.ascontiguousarray(
        drifted.reshape(6, experts, topology.nodes, topology.gpus_per_node).sum(axis=3)
    )
    copies = m.copies_per_gpu(phy2log, topology, experts)[0]
    got = placement_search.drifted_peak(
        copies, drifted, node_tokens, topology.node_of_gpu(), topology.nodes
    )
    shares = []
    for window in drifted:
        tokens = np.ascontiguousarray(window.T)[None]
        gpu_load = m.dispatch(phy2log, topology, tokens.sum(axis=1), tokens).gpu_load[0]
        shares.append(gpu_load.max() / gpu_load.sum())
    assert got == pytest.approx(float(np.mean(shares)), rel=1e-12)


@pytest.mark.parametrize("topology", [Topology(2, 8, 9), Topology(4, 8, 5), Topology(3, 4, 11)])
def test_global_start_is_eplb_global(topology: Topology) -> None:
    rng = np.random.default_rng(11)
    for _ in range(5):
        load = rng.integers(0, 2000, (1, 128)).astype(np.float64)
        _, counts = eplb.replicate(load[0], topology.slots)
        got = placement_search.global_start(load[0], counts, topology.gpus, topology.slots_per_gpu)
        expected = eplb.global_policy(load, topology)[0].reshape(topology.gpus, -1)
        # The same copy weights on every GPU: only copies of different experts that weigh the
        # same may trade places (EPLB lists spare copies after the first ones).
        per_copy = load[0] / counts
        np.testing.assert_array_equal(
            np.sort(per_copy[got], axis=1), np.sort(per_copy[expected], axis=1)
        )
        np.testing.assert_array_equal(np.bincount(got.ravel(), minlength=128), counts)


def _undo(
    topology: Topology,
    slots: np.ndarray,
    previous: np.ndarray,
    source: np.ndarray,
    caps: tuple[float, float],
) -> tuple[np.ndarray, int]:
    experts = source.shape[0]
    result = slots.copy()
    taken = placement_search.undo_moves(
        result,
        m.copies_per_gpu(result.reshape(1, -1), topology, experts)[0].copy(),
        m.copies_per_gpu(previous.reshape(1, -1), topology, experts)[0],
        source,
        source.sum(axis=1),
        True,
        topology.node_of_gpu(),
        topology.nodes,
        *caps,
    )
    return result, int(taken)


def test_undo_moves_puts_back_a_swap_that_changes_no_load() -> None:
    # Two GPUs on one node, experts of equal load: the plan swapped experts 1 and 2 between the
    # GPUs, which changes nothing for the load, so both copies go back where they were.
    topology = Topology(1, 2, 2)
    previous = np.array([[0, 1], [2, 3]])
    plan = np.array([[0, 2], [1, 3]])
    source = np.full((4, 2), 5.0)
    result, taken = _undo(topology, plan, previous, source, (1e18, 1e18))
    assert taken == 2
    assert [sorted(row) for row in result.tolist()] == [[0, 1], [2, 3]]


def test_undo_moves_never_passes_the_caps() -> None:
    topology = Topology(2, 8, 9)
    phy2log, source, load = _layer(topology, seed=21)
    rng = np.random.default_rng(21)
    previous = rng.permutation(phy2log[0]).reshape(topology.gpus, -1)
    plan = phy2log[0].reshape(topology.gpus, -1)
    tokens = np.ascontiguousarray(source[0].T)
    figures = m.dispatch(phy2log, topology, load, source)
    peak_cap = float(figures.gpu_load[0].max()) * 1.02
    cross_cap = float(figures.cross_node_tokens[0])
    result, taken = _undo(topology, plan, previous, tokens, (peak_cap, cross_cap))
    before = m.experts_moved(previous.reshape(1, -1), phy2log, topology)
    after = m.experts_moved(previous.reshape(1, -1), result.reshape(1, -1), topology)
    assert 0 < taken == before - after
    judged = m.dispatch(result.reshape(1, -1), topology, load, source)
    assert judged.gpu_load[0].max() <= peak_cap * (1 + 1e-9)
    assert judged.cross_node_tokens[0] <= cross_cap * (1 + 1e-9)
    assert set(result.ravel().tolist()) == set(range(load.shape[1]))
