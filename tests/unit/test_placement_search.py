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
