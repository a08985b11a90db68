"""The project's expert planner and its rebalance decision."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama4_operator.planners import eplb, expert_placement
from llama4_operator.planners import placement_metrics as m
from llama4_operator.planners.expert_placement import (
    _GOOD_ENOUGH,
    decide_rebalance,
    linear_placement,
    plan_experts,
    replica_counts,
)
from llama4_operator.planners.placement_metrics import Topology


@st.composite
def problems(draw: st.DrawFn) -> tuple[Topology, np.ndarray]:
    nodes = draw(st.integers(1, 3))
    gpus_per_node = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 12))
    gpus = nodes * gpus_per_node
    slots_per_gpu = draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 2))
    layers = draw(st.integers(1, 3))
    load = draw(
        st.lists(
            st.lists(st.integers(0, 1000), min_size=experts, max_size=experts),
            min_size=layers,
            max_size=layers,
        )
    )
    return Topology(nodes, gpus_per_node, slots_per_gpu), np.array(load, dtype=float)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_every_expert_placed_in_every_slot_layout(problem: tuple[Topology, np.ndarray]) -> None:
    topology, load = problem
    layers, experts = load.shape
    phy2log = plan_experts(topology, layers, experts, load).phy2log
    assert phy2log.shape == (layers, topology.slots)
    for row in phy2log:
        assert set(row.tolist()) == set(range(experts))


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 6))
def test_move_budget_is_respected(problem: tuple[Topology, np.ndarray], budget: int) -> None:
    topology, load = problem
    layers, experts = load.shape
    previous = linear_placement(topology, layers, experts)
    plan = plan_experts(
        topology, layers, experts, load, previous=previous, max_experts_moved=budget
    )
    assert plan.experts_moved <= budget
    assert plan.experts_moved == m.experts_moved(previous, plan.phy2log, topology)
    for row in plan.phy2log:
        assert set(row.tolist()) == set(range(experts))


def test_uniform_load_when_nothing_measured_is_perfectly_balanced() -> None:
    topology = Topology(1, 8, 2)
    phy2log = plan_experts(topology, 4, 16).phy2log
    gpu_load = m.dispatch(phy2log, topology, np.ones((4, 16))).gpu_load
    assert m.balance(gpu_load) == pytest.approx(1.0)


def test_replica_counts_follow_load_per_copy_and_cap_at_gpus() -> None:
    # 5 slots for loads [100, 1, 1] on 2 GPUs: expert 0 may have at most 2 copies (uncapped it
    # would take both spares), so the second spare goes to expert 1 (ties go to the lower id).
    counts = replica_counts(np.array([100.0, 1, 1]), 5, max_copies=2)
    assert counts.tolist() == [2, 2, 1]
    # More slots than experts x GPUs (5 > 2 x 2): spares 1 and 2 go to experts 0 and 1 up to the
    # cap; once both are capped the cap cannot hold and spare 3 goes to expert 0 (50 > 0.5).
    assert replica_counts(np.array([100.0, 1]), 5, max_copies=2).tolist() == [3, 2]


def test_hot_expert_copies_land_on_different_gpus() -> None:
    # One expert carries most tokens; with 2 spare slots it gets 3 copies, on 3 GPUs, where EPLB's
    # global policy may stack copies on one GPU.
    load = np.array([[90.0, 4, 3, 2, 1, 1]])
    topology = Topology(1, 4, 2)
    phy2log = plan_experts(topology, 1, 6, load).phy2log[0]
    gpus_with_hot = {int(slot) // 2 for slot in np.flatnonzero(phy2log == 0)}
    assert len(gpus_with_hot) == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_balance_at_least_eplb_global_on_skewed_loads(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, 17) ** 1.2
    load = np.stack(
        [rng.multinomial(20_000, rng.permutation(weights / weights.sum())) for _ in range(6)]
    )
    topology = Topology(1, 8, 3)
    ours = plan_experts(topology, 6, 16, load.astype(float)).phy2log
    theirs = eplb.global_policy(load.astype(float), topology)
    ours_balance = m.balance(m.dispatch(ours, topology, load.astype(float)).gpu_load)
    theirs_balance = m.balance(m.dispatch(theirs, topology, load.astype(float)).gpu_load)
    assert ours_balance >= theirs_balance - 1e-9


def test_replanning_a_balanced_placement_moves_nothing() -> None:
    rng = np.random.default_rng(7)
    load = rng.integers(1, 100, size=(3, 16)).astype(float)
    topology = Topology(2, 4, 3)
    first = plan_experts(topology, 3, 16, load).phy2log
    again = plan_experts(topology, 3, 16, load, previous=first)
    assert again.experts_moved == 0
    assert again.phy2log.tolist() == first.tolist()


def test_sources_keep_tokens_on_their_node() -> None:
    # Node 0's GPU asks only for experts 0 and 1, node 1's only for 2 and 3; one GPU per node with
    # two slots: the placement that keeps every token home exists and is perfectly balanced.
    source = np.array([[[5.0, 5, 0, 0], [0, 0, 5, 5]]])
    load = source.sum(axis=1)
    topology = Topology(2, 1, 2)
    phy2log = plan_experts(topology, 1, 4, load, source_load=source).phy2log
    figures = m.evaluate(phy2log, topology, load, source_load=source)
    assert figures.cross_node_bytes == 0
    assert figures.balance == pytest.approx(1.0)


def test_memory_that_does_not_fit_is_refused_with_the_figures() -> None:
    with pytest.raises(ValueError, match="gpu_memory_bytes is 1000"):
        plan_experts(Topology(1, 2, 2), 2, 4, expert_bytes=300, gpu_memory_bytes=1000)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"load": np.ones((2, 3))}, "load must be"),
        ({"source_load": np.ones((1, 3, 4))}, "source_load must be"),
        ({"previous": np.array([[0, 1, 2, 2]])}, r"previous\[0\]"),
    ],
)
def test_bad_shapes_name_the_field(kwargs: dict[str, np.ndarray], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        plan_experts(
            Topology(1, 2, 2),
            1,
            4,
            kwargs.get("load"),
            source_load=kwargs.get("source_load"),
            previous=kwargs.get("previous"),
        )


def test_linear_placement_is_contiguous() -> None:
    assert linear_placement(Topology(1, 2, 3), 1, 4).tolist() == [[0, 1, 2, 3, 0, 1]]


def _skewed_previous() -> tuple[Topology, np.ndarray, np.ndarray]:
    topology = Topology(1, 4, 2)
    previous = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    load = np.array([[50.0, 40, 1, 1, 1, 1, 1, 1]])  # experts 0 and 1 share GPU 0
    return topology, previous, load


def test_rebalance_when_balance_falls_below_threshold() -> None:
    topology, previous, load = _skewed_previous()
    decision = decide_rebalance(previous, topology, load, threshold=0.8, max_experts_moved=4)
    assert decision.rebalance
    assert decision.phy2log is not None
    assert decision.planned_balance > decision.current_balance
    assert 0 < decision.experts_moved <= 4
    assert m.experts_moved(previous, decision.phy2log, topology) == decision.experts_moved


def test_no_rebalance_above_threshold_or_without_budget() -> None:
    topology, previous, load = _skewed_previous()
    above = decide_rebalance(previous, topology, load, threshold=0.1, max_experts_moved=4)
    assert not above.rebalance
    assert above.phy2log is None
    no_budget = decide_rebalance(previous, topology, load, threshold=0.8, max_experts_moved=0)
    assert not no_budget.rebalance
    assert "within 0 moves" in no_budget.reason


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_repair_stays_within_tolerance_of_a_fresh_plan(
    problem: tuple[Topology, np.ndarray], seed: int
) -> None:
    # Without a move budget the repair either reaches `balance_slack` below a fresh plan's
    # layer balance (a fresh plan past _GOOD_ENOUGH counts as _GOOD_ENOUGH: past it the planner
    # stops searching) or falls back to the fresh plan itself, so no layer may end up further
    # below.
    topology, load = problem
    layers, experts = load.shape
    rng = np.random.default_rng(seed)
    before = rng.permutation(load.T).T  # the same experts, popular in another order
    previous = plan_experts(topology, layers, experts, before).phy2log
    tolerance = 0.01
    fresh = plan_experts(topology, layers, experts, load).phy2log
    repaired = plan_experts(
        topology, layers, experts, load, previous=previous, balance_slack=tolerance
    ).phy2log
    used = np.where(load.sum(axis=1, keepdims=True) > 0, load, 1.0)  # idle layers plan as uniform
    fresh_balance = m.layer_balance(m.dispatch(fresh, topology, used).gpu_load)
    repaired_balance = m.layer_balance(m.dispatch(repaired, topology, used).gpu_load)
    aim = np.minimum(fresh_balance, _GOOD_ENOUGH)
    assert (repaired_balance >= aim - tolerance - 1e-9).all()


def test_a_hot_expert_used_everywhere_gets_copies_on_every_node() -> None:
    # Every GPU sends 10 tokens to expert 0 and 10 to its own node's expert (1 on node 0, 2 on
    # node 1). Four spare slots: expert 0 can hold a copy on each node and every token can stay
    # home with each GPU computing exactly its own 20 tokens, so that is what must come out.
    topology = Topology(2, 2, 2)
    source = np.array([[[10.0, 10, 0], [10, 10, 0], [10, 0, 10], [10, 0, 10]]])
    load = source.sum(axis=1)
    phy2log = plan_experts(topology, 1, 3, load, source_load=source).phy2log
    figures = m.evaluate(phy2log, topology, load, source_load=source)
    assert figures.cross_node_bytes == 0
    assert figures.balance == pytest.approx(1.0)
    nodes_with_hot = {int(slot) // 4 for slot in np.flatnonzero(phy2log[0] == 0)}
    assert nodes_with_hot == {0, 1}


def test_replica_counts_take_spares_in_order_of_load_per_copy() -> None:
    # Loads [9, 6, 2], 4 spare slots, cap not binding. Per copy: 9 is highest (expert 0 -> 2
    # copies, 4.5 per copy); then 6 (expert 1 -> 2 copies, 3); then 4.5 (expert 0 -> 3 copies,
    # 3); then experts 0 and 1 tie at 3 and the tie goes to the lower id: counts [4, 2, 1].
    assert replica_counts(np.array([9.0, 6, 2]), 7, max_copies=4).tolist() == [4, 2, 1]


def test_a_layer_without_source_tokens_is_planned_from_its_load() -> None:
    # Layer 0 saw tokens from both nodes, layer 1 none at all (an idle window): layer 1 must still
    # get every expert, planned as uniform load, instead of dividing by its zero busiest GPU.
    topology = Topology(2, 2, 2)
    busy = np.array([[5.0, 1, 0, 0], [5, 1, 0, 0], [0, 0, 5, 1], [0, 0, 5, 1]])
    source = np.stack([busy, np.zeros_like(busy)])
    load = source.sum(axis=1)
    phy2log = plan_experts(topology, 2, 4, load, source_load=source).phy2log
    for row in phy2log:
        assert set(row.tolist()) == set(range(4))
    gpu_load = m.dispatch(phy2log[1:], topology, np.ones((1, 4))).gpu_load
    assert m.balance(gpu_load) == pytest.approx(1.0)


def _domains(seed: int, topology: Topology, layers: int, experts: int) -> np.ndarray:
    """Per-source tokens where each node mostly asks for its own Zipf-popular experts."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1)
    rows = []
    for _ in range(layers):
        shared = rng.permutation(weights)
        per_node = [0.2 * shared + 0.8 * rng.permutation(weights) for _ in range(topology.nodes)]
        rows.append(
            [
                rng.multinomial(2000, per_node[gpu // topology.gpus_per_node] / sum(weights))
                for gpu in range(topology.gpus)
            ]
        )
    return np.asarray(rows, dtype=float)


@pytest.mark.parametrize("seed", [1, 2])
def test_more_balance_slack_never_sends_more_tokens_off_their_node(seed: int) -> None:
    # A fresh plan takes the candidate with the fewest cross-node tokens among those within the
    # slack of the best balance, so a larger slack can only widen the choice.
    topology = Topology(2, 4, 5)
    source = _domains(seed, topology, 4, 32)
    load = source.sum(axis=1)
    cross = []
    for slack in (0.0, 0.02, 0.1):
        plan = plan_experts(topology, 4, 32, load, source_load=source, balance_slack=slack)
        per_layer = m.dispatch(plan.phy2log, topology, load, source).cross_node_tokens
        cross.append(per_layer)
    assert (cross[1] <= cross[0] + 1e-9).all()
    assert (cross[2] <= cross[1] + 1e-9).all()
    assert cross[2].sum() < cross[0].sum()


def test_replanning_the_same_sourced_window_moves_nothing() -> None:
    topology = Topology(2, 4, 5)
    source = _domains(3, topology, 3, 32)
    load = source.sum(axis=1)
    first = plan_experts(topology, 3, 32, load, source_load=source).phy2log
    again = plan_experts(topology, 3, 32, load, source_load=source, previous=first)
    assert again.experts_moved == 0


def test_a_sourced_repair_moves_fewer_copies_than_a_fresh_plan() -> None:
    # The next window drifts a little: keeping most of the previous placement must move far fewer
    # copies than planning afresh would, and keep every expert placed.
    topology = Topology(2, 4, 5)
    before = _domains(4, topology, 4, 32)
    rng = np.random.default_rng(4)
    after = rng.poisson(before * np.exp(0.2 * rng.standard_normal(before.shape))).astype(float)
    previous = plan_experts(topology, 4, 32, before.sum(axis=1), source_load=before).phy2log
    fresh = plan_experts(topology, 4, 32, after.sum(axis=1), source_load=after).phy2log
    repaired = plan_experts(
        topology, 4, 32, after.sum(axis=1), source_load=after, previous=previous
    )
    assert repaired.experts_moved < m.experts_moved(previous, fresh, topology)
    for row in repaired.phy2log:
        assert set(row.tolist()) == set(range(32))


def test_small_sourced_layers_keep_more_tokens_on_their_node_with_the_node_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scout's shape with two slots per GPU: the copies per node the integer program picks keep
    # tokens on their node that the greedy starts send away, within the same balance slack.
    topology = Topology(2, 8, 2)
    source = _domains(5, topology, 4, 16)
    load = source.sum(axis=1)

    def cross_tokens() -> np.ndarray:
        plan = plan_experts(topology, 4, 16, load, source_load=source)
        per_layer: np.ndarray = m.dispatch(plan.phy2log, topology, load, source).cross_node_tokens
        return per_layer

    with_program = cross_tokens()
    monkeypatch.setattr(expert_placement, "_NODE_PROGRAM_VARIABLES", 0)
    without_program = cross_tokens()
    assert with_program.sum() < without_program.sum()
