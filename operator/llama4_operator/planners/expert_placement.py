"""The project's expert planner: which logical expert each physical slot holds, per MoE layer.

Unlike EPLB (see `eplb.py`), it plans against the dispatch rule the placement is judged by
(`placement_metrics`), and it uses:
- the measured load per expert (uniform when nothing has been measured yet, or for a layer that
  saw no tokens);
- the load split by the GPU the tokens come from, when given: copies start on the nodes that send
  their expert the most tokens, so that tokens stay on their node; a hot expert's copies are
  shared out to nodes by demand, several at once, where that keeps the balance and holds up
  when each node's demand drifts;
- the previous placement: each expert first gets its new number of copies by replacing surplus
  copies; then the first of the previous placement, that corrected one, and both searched with a
  growing move budget that is within the aim is kept. The aim is judged like a fresh plan, over
  drifted windows (with sources: within half of `balance_slack` of a fresh plan's balance there,
  sending at most `_KEEP_CROSS_SLACK` times its tokens off their node; without: the fresh plan's
  balance there, and within `balance_slack` of it on the planning window). Failing that, the
  search goes on toward `balance_slack` below the fresh plan's balance, within the move budget;
  a fresh plan relabelled onto the previous GPUs (a min-cost assignment), with every copy it
  loads that the aim does not need taken back, is used instead when the repair cannot get there
  and the relabelled plan fits the budget;
- bytes per expert and GPU memory: a plan that does not fit is refused with the figures.

A fresh plan, per layer: replica counts by handing spare slots to the expert with the highest load
per copy (at most one copy per GPU while that is possible); copies placed heaviest first on the
least loaded GPU that lacks the expert; then a local search at the busiest GPU with two moves,
swapping two copies between GPUs or replacing a spare copy by a copy of another expert, each
estimated in bulk and checked against the exact dispatch rule before it is taken (compiled with
numba in `placement_search`, which recomputes only the two experts a move touches). Without
sources the search also runs from EPLB's global packing and keeps the better result. With sources
on several nodes it runs from three starts (copies shared out to nodes by demand, copies near
their sources, and EPLB's hierarchical layout, or the plan blind to sources when the experts do
not divide by the nodes), adds EPLB's hierarchical and global layouts unsearched, and on small
layers (`_NODE_PROGRAM_VARIABLES`) the copies per node that send the fewest tokens off their node
under caps on node and copy load, solved exactly by HiGHS (`node_copies`), packed and searched;
it judges each by its busiest GPU over drifted windows (`_drifted_peak`), and keeps the one
sending the fewest tokens off their node among those within `balance_slack` of the best.

Also here: `decide_rebalance`, the pure decision the operator's rebalance loop takes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from llama4_operator.planners import eplb, placement_search
from llama4_operator.planners import placement_metrics as metrics
from llama4_operator.planners.placement_metrics import FloatArray, IntArray, Topology

# How much balance a plan may give up for locality and fewer moves, unless told otherwise.
DEFAULT_BALANCE_SLACK = 0.02
# Local-search bounds per layer: enough for every shape in the benchmark to settle, small enough
# for a Maverick layer to plan in a few milliseconds.
_MAX_SEARCH_STEPS = 200
_CANDIDATES_CHECKED = 4
# A repair starts from a placement planned on another window, where the estimate (each copy's
# tokens move with it) is often wrong under the per-source rule: it tries more candidates.
_REPAIR_CANDIDATES_CHECKED = 16
# A node may take this much more than its even share of the load while copies chase locality.
_NODE_LOAD_SLACK = 0.10
# With sources known, the search may give back locality for balance until this share of the
# cross-node tokens of a plan blind to sources.
_LOCALITY_CAP = 0.6
# The search from copies shared out by demand may send this many times the tokens off their node
# that its start does, to win balance.
_SHARED_CROSS_SLACK = 1.3
# Drifted windows a plan near the sources is judged on, and how much each node's tokens for an
# expert change between windows (the standard deviation of the log of the ratio; the project's
# benchmark drifts its loads by 0.3).
_DRIFT_WINDOWS = 32
_DRIFT_SIGMA = 0.3
# A previous placement may send this many times the tokens off their node that a fresh plan
# would and still be kept.
_KEEP_CROSS_SLACK = 1.1
# Move budgets a repair tries in turn, as shares of a layer's slots, before falling back to the
# fresh plan (EPLB's plan from scratch moves most of the slots).
_MOVE_SHARES = (0.05, 0.1, 0.2)
# `node_copies`' integer program runs for layers with at most this many variables (experts x
# nodes x (GPUs per node + 1)): Scout's 288 solve in about 10 ms; Maverick's 2,000 to 4,600 per
# layer are left to the heuristics, to keep `llama4ctl plan experts` within its 2 s.
_NODE_PROGRAM_VARIABLES = 1000
_NODE_PROGRAM_SECONDS = 0.2
# Caps on one copy's tokens, as shares of a GPU's mean load, for the program's candidates: lower
# keeps the balance, higher keeps more tokens on their node; the planner picks among them.
_COPY_CAPS = (0.6, 0.65, 0.7)
_NODE_PROGRAM_NODE_SLACK = 0.02
# A fresh plan stops searching at this layer balance: past it, moves mostly fit the sampling
# noise of one window, which the next window does not repeat.
_GOOD_ENOUGH = 0.995


@dataclass(frozen=True)
class ExpertPlan:
    """A placement and what it cost to reach it."""

    phy2log: IntArray  # [layers, slots]
    experts_moved: int  # copies loaded onto a GPU relative to `previous` (0 without one)


@dataclass(frozen=True)
class _Layer:
    """One layer's inputs, in the arrays the search works on."""

    topology: Topology
    load: FloatArray  # [experts]
    source: FloatArray | None  # [experts, gpus] tokens by sending GPU
    node_demand: FloatArray | None  # [nodes, experts]
    node_of: IntArray  # node of each GPU
    drifted_source: FloatArray | None = None  # [windows, experts, gpus], see `_drifted_sources`
    drifted_node_tokens: FloatArray | None = None  # [windows, experts, nodes]: their node sums
    drifted_load: FloatArray | None = None  # [windows, experts], without sources
    # `_drifted_peak` by placement: the planner judges the same placement more than once.
    drifted_peaks: dict[bytes, float] = field(default_factory=dict)

    @property
    def experts(self) -> int:
        return len(self.load)

    def kernel_inputs(self) -> tuple[FloatArray, FloatArray, bool, IntArray, int]:
        """The arguments every `placement_search` kernel takes about the layer: source (a
        placeholder without one), load, whether sources are known, node of each GPU, nodes."""
        source = (
            np.zeros((1, 1), dtype=np.float64)
            if self.source is None
            else np.ascontiguousarray(self.source, dtype=np.float64)
        )
        load = np.ascontiguousarray(self.load, dtype=np.float64)
        return source, load, self.source is not None, self.node_of, self.topology.nodes


def uniform_load(layers: int, experts: int) -> FloatArray:
    """The load assumed before anything has been measured."""
    return np.ones((layers, experts), dtype=np.float64)


def linear_placement(topology: Topology, layers: int, experts: int) -> IntArray:
    """The contiguous layout engines start from: slot p holds expert p mod experts, so GPU q holds
    a run of consecutive experts and the spare slots repeat the first experts."""
    row = np.arange(topology.slots, dtype=np.int64) % experts
    return np.tile(row, (layers, 1))


def replica_counts(load: FloatArray, slots: int, max_copies: int) -> IntArray:
    """Copies per expert: spare slots go one by one to the highest load per copy (ties to the
    lower id), at most `max_copies` each while every expert can still take one more."""
    experts = len(load)
    counts = [1] * experts
    loads = [float(value) for value in load]
    # A heap of (-load per copy, expert) over the experts below the cap: a Python heap beats a
    # numpy argmax per spare slot by an order of magnitude at these sizes.
    open_heap = [(-loads[e], e) for e in range(experts)] if max_copies > 1 else []
    heapq.heapify(open_heap)
    capped = [] if max_copies > 1 else list(range(experts))
    for _ in range(slots - experts):
        if not open_heap:
            # Every expert is at the cap (more slots than experts x GPUs): the cap cannot hold.
            open_heap = [(-loads[e] / counts[e], e) for e in capped]
            heapq.heapify(open_heap)
            capped, max_copies = [], slots
        _, expert = heapq.heappop(open_heap)
        counts[expert] += 1
        if counts[expert] < max_copies:
            heapq.heappush(open_heap, (-loads[expert] / counts[expert], expert))
        else:
            capped.append(expert)
    return np.asarray(counts, dtype=np.int64)


def _copies(slots: IntArray, experts: int) -> IntArray:
    """[gpus, slots_per_gpu] expert ids -> copies [experts, gpus]."""
    gpus = slots.shape[0]
    index = slots * gpus + np.arange(gpus)[:, None]
    return np.bincount(index.ravel(), minlength=experts * gpus).reshape(experts, gpus)


def _score(layer: _Layer, slots: IntArray) -> tuple[FloatArray, float]:
    """Apply the dispatch rule to `slots`: the tokens each GPU computes and the tokens leaving
    their node."""
    copies = _copies(np.asarray(slots, dtype=np.int64), layer.experts)
    if layer.source is None:
        # Plain numpy without sources, so that a plan that needs no search (the uniform load the
        # renderer plans from) never waits for the kernels to compile.
        weights = (layer.load / copies.sum(axis=1))[slots]
        return weights.sum(axis=1), 0.0
    source, load, has_source, node_of, nodes = layer.kernel_inputs()
    gpu_load, cross = placement_search.layer_dispatch(
        copies, source, load, has_source, node_of, nodes
    )
    return gpu_load, float(cross)


def _construct(layer: _Layer, counts: IntArray) -> IntArray:
    """Greedy placement, heaviest copies first, each on the least loaded GPU that lacks it."""
    if layer.node_demand is not None and layer.topology.nodes > 1:
        return _construct_near_sources(layer, counts)
    topology = layer.topology
    per_gpu = topology.slots_per_gpu
    slots = [[] for _ in range(topology.gpus)]  # type: list[list[int]]
    # A heap of (load, gpu) over GPUs with a free slot; plain Python beats numpy at this size.
    heap = [(0.0, gpu) for gpu in range(topology.gpus)]
    for expert in np.argsort(-(layer.load / counts), kind="stable").tolist():
        per_copy = float(layer.load[expert]) / int(counts[expert])
        skipped = []
        for _ in range(int(counts[expert])):
            while heap and expert in slots[heap[0][1]]:
                skipped.append(heapq.heappop(heap))
            # Every open GPU holds the expert already: a duplicate on one GPU is legal.
            gpu_load, gpu = heapq.heappop(heap) if heap else skipped.pop(0)
            slots[gpu].append(expert)
            if len(slots[gpu]) < per_gpu:
                heapq.heappush(heap, (gpu_load + per_copy, gpu))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return np.asarray(slots, dtype=np.int64)


def _construct_near_sources(layer: _Layer, counts: IntArray) -> IntArray:
    """Like `_construct`, but each copy goes to the node that sends the expert most tokens (a
    node without a copy first), as long as that node is under its share of the load plus
    `_NODE_LOAD_SLACK`; when every open node is over, to the least loaded one."""
    assert layer.node_demand is not None
    topology = layer.topology
    order = np.argsort(-(layer.load / counts), kind="stable").astype(np.int64)
    return placement_search.construct_near_sources(
        np.ascontiguousarray(layer.load, dtype=np.float64),
        counts.astype(np.int64),
        np.ascontiguousarray(layer.node_demand.T, dtype=np.float64),
        order,
        topology.gpus_per_node,
        topology.slots_per_gpu,
        _NODE_LOAD_SLACK,
    )


def _construct_by_node_demand(layer: _Layer, counts: IntArray) -> IntArray:
    """Copies shared out to nodes by their demand, then packed onto each node's GPUs.

    Each expert's first copy goes to the node that sends it the most tokens (heaviest experts
    first); every further copy goes where the expert's tokens per copy on a node are highest
    (`demand / (copies there + 1)`, so a node without a copy, whose tokens would otherwise leave
    it, comes first). Several copies of a hot expert thus land together on the nodes that use it,
    and a node's load follows its own tokens. Each node then packs its copies heaviest first onto
    its least loaded GPU that lacks the expert.
    """
    assert layer.node_demand is not None
    topology = layer.topology
    demand = layer.node_demand.T  # [experts, nodes]
    nodes, per_node = topology.nodes, topology.gpus_per_node
    on_node = placement_search.share_by_node_demand(
        np.ascontiguousarray(layer.load, dtype=np.float64),
        counts.astype(np.int64),
        np.ascontiguousarray(demand, dtype=np.float64),
        topology.slots // nodes,
        per_node,
    )
    return _pack_on_nodes(layer, on_node)


def _pack_on_nodes(layer: _Layer, on_node: IntArray) -> IntArray:
    """Each node's copies (`on_node` [experts, nodes]) packed onto its GPUs, heaviest first,
    each on the least loaded GPU that lacks the expert."""
    assert layer.node_demand is not None
    demand = layer.node_demand.T  # [experts, nodes]
    # Tokens from nodes without a copy split evenly over all copies.
    spill = np.where(on_node == 0, demand, 0.0).sum(axis=1) / on_node.sum(axis=1)
    weight = np.where(on_node > 0, demand / np.maximum(on_node, 1), 0.0) + spill[:, None]
    return placement_search.pack_nodes(
        np.ascontiguousarray(on_node, dtype=np.int64),
        np.ascontiguousarray(weight),
        layer.topology.gpus_per_node,
        layer.topology.slots_per_gpu,
    )


def _node_program_fits(layer: _Layer) -> bool:
    """Whether the layer is small enough for `node_copies`' integer program
    (`_NODE_PROGRAM_VARIABLES`)."""
    topology = layer.topology
    variables = layer.experts * topology.nodes * (topology.gpus_per_node + 1)
    return layer.node_demand is not None and variables <= _NODE_PROGRAM_VARIABLES


def _node_program_starts(layer: _Layer) -> list[IntArray]:
    """Placements from the copies per node that send the fewest tokens off their node
    (`node_copies`, solved by HiGHS), one per copy cap in `_COPY_CAPS`, packed onto GPUs."""
    # Imported here: scipy.optimize is slow to import, and only small layers use it.
    from llama4_operator.planners.node_copies import node_copies  # noqa: PLC0415

    assert layer.node_demand is not None
    topology = layer.topology
    total = float(layer.load.sum())
    starts = []
    for cap in _COPY_CAPS:
        on_node = node_copies(
            np.ascontiguousarray(layer.node_demand.T),
            topology.gpus_per_node,
            topology.slots_per_gpu,
            node_cap=total / topology.nodes * (1 + _NODE_PROGRAM_NODE_SLACK),
            copy_cap=cap * total / topology.gpus,
            time_limit=_NODE_PROGRAM_SECONDS,
        )
        if on_node is not None:
            starts.append(_pack_on_nodes(layer, on_node))
    return starts


@dataclass(frozen=True)
class _Searched:
    """A searched layer placement with the figures the planner compares."""

    slots: IntArray  # [gpus, slots_per_gpu]
    moves: int  # copies loaded by the search
    peak: float  # the busiest GPU's load
    cross: float  # tokens leaving their node


def _search(
    layer: _Layer,
    slots: IntArray,
    stop_peak: float,
    move_budget: int | None,
    cross_cap: float,
    checked: int = _CANDIDATES_CHECKED,
) -> _Searched:
    """Local search at the busiest GPU until its load is at most `stop_peak`, no move helps, or
    the budget (copies loaded onto GPUs) is spent. A move may raise the tokens leaving their
    node up to `cross_cap`, never beyond (nor beyond what they were before it, if higher); the
    best few of the candidate moves by estimate, `checked`, are tried against the exact rule.

    A fresh plan without sources (no budget) only tries swaps: its replica counts are already the
    greedy optimum for an even split. With sources, copies near their tokens take more than an
    even share, so replacing copies helps there too.
    Compiled in `placement_search.local_search`."""
    budget = 10**9 if move_budget is None else move_budget
    searched = np.array(slots, dtype=np.int64, order="C")
    if layer.source is None:
        gpu_load, _ = _score(layer, searched)
        peak = float(gpu_load.max())
        if budget <= 0 or peak <= stop_peak + 1e-9 * max(float(gpu_load.sum()), 1.0):
            return _Searched(searched, 0, peak, 0.0)
    copies = _copies(searched, layer.experts)
    source, load, has_source, node_of, nodes = layer.kernel_inputs()
    moves, peak, cross = placement_search.local_search(
        searched,
        copies,
        source,
        load,
        has_source,
        node_of,
        nodes,
        float(stop_peak),
        int(budget),
        float(cross_cap),
        move_budget is not None or has_source,
        _MAX_SEARCH_STEPS,
        checked,
    )
    return _Searched(searched, int(moves), float(peak), float(cross))


def _relabel_onto(previous: IntArray, fresh: IntArray, experts: int, group: int) -> IntArray:
    """Renumber the fresh plan's GPUs within each run of `group` GPUs (all GPUs, a node's, or
    none for 1) to share the most copies with the previous placement (a min-cost assignment),
    and keep shared experts in their previous slot."""
    # Imported here, and csgraph's matching rather than scipy.optimize's assignment: the CLI
    # starts faster (scipy.optimize takes twice as long to import), and most plans never relabel.
    from scipy.sparse import csr_array  # noqa: PLC0415
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching  # noqa: PLC0415

    before = _copies(previous, experts)
    after = _copies(fresh, experts)
    gpus = previous.shape[0]
    target_of = np.arange(gpus)
    if group > 1:
        for start in range(0, gpus, group):
            block = slice(start, start + group)
            overlap = np.minimum(after[:, block, None], before[:, None, block]).sum(axis=0)
            # Costs above zero (a sparse graph has no zero-weight edges): the most overlap is the
            # least cost, as every matching pairs all GPUs.
            cost = csr_array((overlap.max() + 1 - overlap).astype(np.float64))
            rows, cols = min_weight_full_bipartite_matching(cost)
            target_of[start + rows] = start + cols
    result = np.empty_like(previous)
    for new_gpu in range(gpus):
        gpu = int(target_of[new_gpu])
        wanted = list(fresh[new_gpu])
        row = [-1] * previous.shape[1]
        for position, expert in enumerate(previous[gpu]):
            if expert in wanted:
                wanted.remove(expert)
                row[position] = int(expert)
        for position in range(len(row)):
            if row[position] < 0:
                row[position] = wanted.pop()
        result[gpu] = row
    return result


def _undo_moves(
    layer: _Layer, previous: IntArray, slots: IntArray, peak_cap: float, cross_cap: float
) -> IntArray:
    """`slots` with the copies it loads relative to `previous` taken back where the busiest GPU
    stays within `peak_cap` and the tokens leaving their node within `cross_cap` (compiled in
    `placement_search.undo_moves`)."""
    result = np.array(slots, dtype=np.int64, order="C")
    source, load, has_source, node_of, nodes = layer.kernel_inputs()
    placement_search.undo_moves(
        result,
        _copies(result, layer.experts),
        _copies(np.asarray(previous, dtype=np.int64), layer.experts),
        source,
        load,
        has_source,
        node_of,
        nodes,
        float(peak_cap),
        float(cross_cap),
    )
    return result


def _moves(previous: IntArray, current: IntArray, experts: int) -> int:
    gained = _copies(current, experts) - _copies(previous, experts)
    return int(np.clip(gained, 0, None).sum())


def _peak(layer: _Layer, slots: IntArray) -> float:
    return float(_score(layer, slots)[0].max())


def _cross(layer: _Layer, slots: IntArray) -> float:
    return _score(layer, slots)[1]


def _repair_counts(
    layer: _Layer, slots: IntArray, counts: IntArray, move_budget: int
) -> tuple[IntArray, int]:
    """Give each expert the number of copies `counts` asks for, one replaced copy per move: the
    surplus copy replaced is the one on the busiest GPU that lacks the expert in deficit."""
    repaired = np.array(slots, dtype=np.int64, order="C")
    copies = _copies(repaired, layer.experts)
    order = np.argsort(-(layer.load / counts), kind="stable").astype(np.int64)
    source, load, has_source, node_of, nodes = layer.kernel_inputs()
    moves = placement_search.repair_counts(
        repaired,
        copies,
        source,
        load,
        has_source,
        node_of,
        nodes,
        counts.astype(np.int64),
        order,
        int(move_budget),
    )
    return repaired, int(moves)


def _fresh(layer: _Layer, counts: IntArray, balance_slack: float) -> _Searched:
    """A plan that ignores the previous placement.

    Without sources (or on one node), the greedy start is searched, and EPLB's global packing too
    when the greedy one stays short of `_GOOD_ENOUGH`. With sources on several nodes, up to three
    starts are searched: copies shared out to nodes by demand (`_construct_by_node_demand`),
    copies near their sources, and EPLB's hierarchical layout (each expert's copies on one node,
    when the experts divide by the nodes). Each is judged by its busiest GPU averaged over drifted
    windows (`_drifted_peak`), since the next window, not the planning one, is what a deployment
    lives with; EPLB's hierarchical and global layouts, unsearched, are candidates too. Of those
    within `balance_slack` of the best such balance, the one sending the fewest tokens off their
    node wins.
    """
    topology = layer.topology
    mean = float(layer.load.sum()) / topology.gpus
    if layer.source is None or topology.nodes == 1:
        return _fresh_blind(layer, counts)
    candidates = []
    reference_cross = None
    if layer.experts % topology.nodes == 0:
        # EPLB's hierarchical layout (`eplb.hierarchical_policy`), compiled.
        grouped_start = placement_search.hierarchical_start(
            np.ascontiguousarray(layer.load, dtype=np.float64),
            topology.nodes,
            topology.gpus_per_node,
            topology.slots_per_gpu,
        )
        reference_cross = _cross(layer, grouped_start)
        # Unsearched too: the search fits the planning window, which drift may not repeat.
        grouped_load, _ = _score(layer, grouped_start)
        candidates.append(_Searched(grouped_start, 0, float(grouped_load.max()), reference_cross))
        candidates.append(_search(layer, grouped_start, mean / _GOOD_ENOUGH, None, reference_cross))
    else:
        blind = _fresh_blind(layer, counts)
        reference_cross = _cross(layer, blind.slots)
        candidates.append(_search(layer, blind.slots, mean / _GOOD_ENOUGH, None, reference_cross))
    # EPLB's global layout scatters copies over nodes, which sometimes keeps more tokens on their
    # node than the hierarchical one: the locality searches below are capped relative to the
    # fewer of the two, and it is a candidate itself.
    scattered = placement_search.global_start(
        np.ascontiguousarray(layer.load, dtype=np.float64),
        counts.astype(np.int64),
        topology.gpus,
        topology.slots_per_gpu,
    )
    scattered_load, scattered_cross = _score(layer, scattered)
    candidates.append(_Searched(scattered, 0, float(scattered_load.max()), scattered_cross))
    reference_cross = min(reference_cross, scattered_cross)
    candidates.append(
        _search(
            layer,
            _construct(layer, counts),
            mean / _GOOD_ENOUGH,
            None,
            _LOCALITY_CAP * reference_cross,
        )
    )
    shared_start = _construct_by_node_demand(layer, counts)
    # The search may send a few more tokens off their node than the start does, for balance.
    shared_cap = min(
        _SHARED_CROSS_SLACK * _cross(layer, shared_start), _LOCALITY_CAP * reference_cross
    )
    candidates.append(
        _search(
            layer,
            shared_start,
            mean / _GOOD_ENOUGH,
            None,
            max(shared_cap, _cross(layer, shared_start)),
        )
    )
    if _node_program_fits(layer):
        # The copies per node that keep the most tokens on their node, found exactly; searched
        # for balance without sending more tokens off their node.
        for start in _node_program_starts(layer):
            candidates.append(
                _search(layer, start, mean / _GOOD_ENOUGH, None, _cross(layer, start))
            )
    drifted = [_drifted_peak(layer, candidate.slots) for candidate in candidates]
    floor = mean / min(drifted) - balance_slack
    eligible = [
        candidate
        for candidate, peak in zip(candidates, drifted, strict=True)
        if mean / peak >= floor
    ]
    return min(eligible, key=lambda candidate: candidate.cross)


def _fresh_blind(layer: _Layer, counts: IntArray) -> _Searched:
    """A fresh plan from the load alone: the greedy start searched, and EPLB's global packing too
    when the greedy one stays short of `_GOOD_ENOUGH`."""
    topology = layer.topology
    mean = float(layer.load.sum()) / topology.gpus
    blind = _Layer(topology, layer.load, None, None, layer.node_of)
    greedy = _search(blind, _construct(blind, counts), mean / _GOOD_ENOUGH, None, 0.0)
    if mean / greedy.peak >= _GOOD_ENOUGH:
        return greedy
    # EPLB's packing of copies sometimes lands in a better spot than the greedy start;
    # search from it too and keep the better of the two.
    packed_start = eplb.global_policy(layer.load[None], topology)[0].reshape(
        topology.gpus, topology.slots_per_gpu
    )
    packed = _search(blind, packed_start, mean / _GOOD_ENOUGH, None, 0.0)
    # EPLB may stack two copies of an expert on one GPU, which gives that GPU two shares of
    # the expert's tokens: a finer split that sometimes packs better, so it is allowed.
    return packed if packed.peak < greedy.peak else greedy


def _drifted_peak(layer: _Layer, slots: IntArray) -> float:
    """The busiest GPU's load under the source dispatch rule, averaged over the layer's drifted
    windows (`_drifted_sources`)."""
    copies = _copies(np.asarray(slots, dtype=np.int64), layer.experts)
    key = copies.tobytes()
    if key in layer.drifted_peaks:
        return layer.drifted_peaks[key]
    if layer.drifted_source is None:
        # Without sources each expert's tokens split evenly over its copies.
        assert layer.drifted_load is not None
        gpu_load = (layer.drifted_load / copies.sum(axis=1)) @ copies  # [windows, gpus]
        share = float((gpu_load.max(axis=1) / gpu_load.sum(axis=1)).mean())
        layer.drifted_peaks[key] = share * float(layer.load.sum())
    else:
        assert layer.drifted_node_tokens is not None
        share = placement_search.drifted_peak(
            copies,
            layer.drifted_source,
            layer.drifted_node_tokens,
            layer.node_of,
            layer.topology.nodes,
        )
        # Each drifted window carries the planning window's tokens, so only their split changes.
        layer.drifted_peaks[key] = float(share) * float(layer.load.sum())
    return layer.drifted_peaks[key]


def _drifted_loads(load: FloatArray) -> FloatArray:
    """Like `_drifted_sources`, without sources: each expert's tokens scaled per window."""
    rng = np.random.default_rng(0)
    factor = np.exp(_DRIFT_SIGMA * rng.standard_normal((_DRIFT_WINDOWS, len(load))))
    return np.ascontiguousarray(load[None, :] * factor)


def _drifted_sources(source: FloatArray, node_of: IntArray, nodes: int) -> FloatArray:
    """`_DRIFT_WINDOWS` windows [window, expert, gpu] in which the tokens each node sends to each
    expert change by a random factor (log-normal, `_DRIFT_SIGMA`). Seeded, so plans are
    deterministic and every placement of a layer is judged on the same windows."""
    rng = np.random.default_rng(0)
    factor = np.exp(_DRIFT_SIGMA * rng.standard_normal((_DRIFT_WINDOWS, source.shape[0], nodes)))
    return np.ascontiguousarray(source[None, :, :] * factor[:, :, node_of])


def _peak_at(mean: float, balance: float) -> float:
    return mean / max(balance, 1e-6)


def _least_moves_within_aim(
    layer: _Layer,
    previous: IntArray,
    repaired: IntArray,
    repair_moves: int,
    fresh: _Searched,
    move_budget: int,
    tol: float,
) -> IntArray | None:
    """The previous placement, the one with corrected replica counts, or either searched with a
    growing move budget (`_MOVE_SHARES`), whichever comes first within the aim. The aim is judged
    like a fresh plan, on drifted windows: with sources, within half of `tol` of the fresh plan's
    balance there, sending at most `_KEEP_CROSS_SLACK` times its tokens off their node; without,
    the fresh plan's balance there, and within `tol` of it on this window. None when none gets
    there."""
    mean = float(layer.load.sum()) / layer.topology.gpus
    # Without sources the even split leaves placement less to gain over drift, and any slack
    # taken there showed as lost next-window balance: the aim is the fresh plan's own, and the
    # planning window's balance stays within `tol` of the fresh plan's too.
    aim = mean / _drifted_peak(layer, fresh.slots) - (tol / 2 if layer.source is not None else 0.0)
    cross_cap = _KEEP_CROSS_SLACK * fresh.cross
    peak_cap = _peak_at(mean, mean / fresh.peak - tol) * (1 + 1e-9)

    def within_aim(slots: IntArray) -> bool:
        if layer.source is None and _peak(layer, slots) > peak_cap:
            return False
        return _cross(layer, slots) <= cross_cap and mean / _drifted_peak(layer, slots) >= aim

    for kept in (previous, repaired):
        if within_aim(kept):
            return np.asarray(kept, dtype=np.int64)
    # Replica counts planned for an even split often fit the source rule badly: the search also
    # starts from the previous placement as it is.
    for share in _MOVE_SHARES:
        budget = max(1, int(share * layer.topology.slots))
        for start, spent in ((previous, 0), (repaired, repair_moves)):
            searched = _search(
                layer,
                start,
                fresh.peak,
                min(budget, move_budget) - spent,
                cross_cap,
                _REPAIR_CANDIDATES_CHECKED,
            )
            if within_aim(searched.slots):
                return searched.slots
    return None


def _plan_layer(layer: _Layer, previous: IntArray | None, move_budget: int, tol: float) -> IntArray:
    """A fresh plan, or with `previous` a repair of it within `move_budget` moves.

    The repair gives each expert its new number of copies, then keeps the first of the previous
    placement, the corrected one and their searches with a growing move budget that is within
    the aim (`_least_moves_within_aim`). Failing that it searches until the layer is within
    `tol` of a fresh plan's balance on this window; a fresh plan relabelled onto the previous
    GPUs, with every copy it loads that the aim does not need taken back (`_undo_moves`),
    replaces a repair that cannot get there, when it fits the budget.
    """
    topology = layer.topology
    counts = replica_counts(layer.load, topology.slots, topology.gpus)
    if previous is None:
        return _fresh(layer, counts, tol).slots
    mean = float(layer.load.sum()) / topology.gpus
    repaired, moves = _repair_counts(layer, previous, counts, move_budget)
    fresh = _fresh(layer, counts, tol)
    kept = _least_moves_within_aim(layer, previous, repaired, moves, fresh, move_budget, tol)
    if kept is not None:
        return kept
    target = _peak_at(mean, mean / fresh.peak - tol)
    # With sources, the repair may send as many tokens off their node as the fresh plan does.
    searched = _search(
        layer, repaired, target, move_budget - moves, fresh.cross, _REPAIR_CANDIDATES_CHECKED
    )
    if searched.peak <= target * (1 + 1e-9):
        return searched.slots
    if layer.source is None:
        relabelled = _relabel_onto(previous, fresh.slots, layer.experts, topology.gpus)
    else:
        # With sources, GPUs may only be renumbered within a node: that keeps each node's copies,
        # so the tokens leaving nodes, but changes which GPU's own tokens stay on it; the
        # renumbering is kept only while the busiest GPU stays within the aim.
        relabelled = _relabel_onto(previous, fresh.slots, layer.experts, topology.gpus_per_node)
        if _peak(layer, relabelled) > target * (1 + 1e-9):
            relabelled = _relabel_onto(previous, fresh.slots, layer.experts, 1)
    cross_cap = 0.0 if layer.source is None else _KEEP_CROSS_SLACK * fresh.cross
    relabelled = _undo_moves(layer, previous, relabelled, target, cross_cap)
    if _moves(previous, relabelled, layer.experts) <= move_budget:
        return relabelled
    return searched.slots


def plan_experts(
    topology: Topology,
    layers: int,
    experts: int,
    load: FloatArray | None = None,
    *,
    source_load: FloatArray | None = None,
    previous: IntArray | None = None,
    expert_bytes: int | IntArray = 0,
    gpu_memory_bytes: int | None = None,
    max_experts_moved: int | None = None,
    balance_slack: float = DEFAULT_BALANCE_SLACK,
) -> ExpertPlan:
    """Plan phy2log [layers, slots] for `topology`.

    `load` [layers, experts] (uniform when None); `source_load` [layers, gpus, experts];
    `previous` [layers, slots]; `max_experts_moved` bounds copies loaded onto GPUs over all layers
    (spread evenly, the remainder to the first layers). `balance_slack` trades balance for
    locality and migration: how much layer balance a plan may give up against the best one found
    to send fewer tokens off their node (judged on drifted windows, with sources), and how far
    below the balance it aims at a repaired previous placement may stay to save moves (see the
    module docstring). The default, 0.02, is the setting the benchmark's Pareto curve
    (`benchmarks/placement/results.md`) shows meeting most targets; 0 asks for balance first.
    """
    _check_inputs(topology, layers, experts, load=load, source_load=source_load, previous=previous)
    _check_memory(topology, layers, expert_bytes, gpu_memory_bytes)
    window = uniform_load(layers, experts) if load is None else np.asarray(load, dtype=np.float64)
    if float(window.sum()) == 0.0:
        window = uniform_load(layers, experts)
    if max_experts_moved is None:
        budgets = [10**9] * layers
    else:
        share, extra = divmod(max_experts_moved, layers)
        budgets = [share + (1 if layer < extra else 0) for layer in range(layers)]
    rows = []
    per_gpu = topology.slots_per_gpu
    for index in range(layers):
        source = (
            None
            if source_load is None
            else np.ascontiguousarray(np.asarray(source_load[index], dtype=np.float64).T)
        )
        if source is not None and float(source.sum()) == 0.0:
            # No token seen by source: nothing to keep near, plan from the load alone.
            source = None
        node_demand = (
            None
            if source is None
            else source.reshape(experts, topology.nodes, topology.gpus_per_node).sum(axis=2).T
        )
        # A layer that saw no tokens is planned as if its load were uniform.
        layer_load = window[index] if window[index].sum() > 0 else np.ones(experts)
        node_of = topology.node_of_gpu()
        drifted = None if source is None else _drifted_sources(source, node_of, topology.nodes)
        drifted_load = None if source is not None else _drifted_loads(layer_load)
        drifted_nodes = (
            None
            if drifted is None
            else np.ascontiguousarray(
                drifted.reshape(_DRIFT_WINDOWS, experts, topology.nodes, -1).sum(axis=3)
            )
        )
        layer = _Layer(
            topology,
            layer_load,
            source,
            node_demand,
            node_of,
            drifted,
            drifted_nodes,
            drifted_load,
        )
        prev = None if previous is None else np.asarray(previous[index]).reshape(-1, per_gpu)
        rows.append(_plan_layer(layer, prev, budgets[index], balance_slack).ravel())
    phy2log = np.stack(rows).astype(np.int64)
    moved = (
        0 if previous is None else metrics.experts_moved(np.asarray(previous), phy2log, topology)
    )
    return ExpertPlan(phy2log=phy2log, experts_moved=moved)


def _check_inputs(
    topology: Topology,
    layers: int,
    experts: int,
    *,
    load: FloatArray | None,
    source_load: FloatArray | None,
    previous: IntArray | None,
) -> None:
    if topology.slots < experts:
        raise ValueError(
            f"{topology.slots} slots (nodes x gpus_per_node x slots_per_gpu) cannot hold "
            f"{experts} experts: raise slots_per_gpu or add GPUs"
        )
    if load is not None and np.shape(load) != (layers, experts):
        raise ValueError(f"load must be [{layers}][{experts}], got {list(np.shape(load))}")
    if source_load is not None and np.shape(source_load) != (layers, topology.gpus, experts):
        raise ValueError(
            f"source_load must be [{layers}][{topology.gpus}][{experts}], "
            f"got {list(np.shape(source_load))}"
        )
    if previous is not None:
        prev = np.asarray(previous)
        if prev.shape != (layers, topology.slots):
            raise ValueError(
                f"previous must be [{layers}][{topology.slots}], got {list(prev.shape)}"
            )
        for index, row in enumerate(prev):
            if (
                len(np.unique(row[(row >= 0) & (row < experts)])) != experts
                or ((row < 0) | (row >= experts)).any()
            ):
                raise ValueError(
                    f"previous[{index}] must hold expert ids 0..{experts - 1}, each at least once"
                )


def _check_memory(
    topology: Topology, layers: int, expert_bytes: int | IntArray, gpu_memory_bytes: int | None
) -> None:
    if gpu_memory_bytes is None:
        return
    largest = int(np.max(expert_bytes)) if not isinstance(expert_bytes, int) else expert_bytes
    needed = largest * topology.slots_per_gpu * layers
    if needed > gpu_memory_bytes:
        raise ValueError(
            f"experts need up to {needed} bytes per GPU (expert_bytes x slots_per_gpu x layers) "
            f"but gpu_memory_bytes is {gpu_memory_bytes}: lower slots_per_gpu or add GPUs"
        )


@dataclass(frozen=True)
class RebalanceDecision:
    """What the rebalance loop should do with the latest load window."""

    rebalance: bool
    reason: str
    current_balance: float
    planned_balance: float
    experts_moved: int
    phy2log: IntArray | None  # the new placement when `rebalance`


def decide_rebalance(
    current: IntArray,
    topology: Topology,
    load: FloatArray,
    *,
    threshold: float,
    max_experts_moved: int,
    source_load: FloatArray | None = None,
    min_gain: float = 0.01,
    balance_slack: float = DEFAULT_BALANCE_SLACK,
) -> RebalanceDecision:
    """Re-plan when the current placement's balance on `load` is below `threshold`, moving at most
    `max_experts_moved` copies, and only if the new plan gains at least `min_gain` balance."""
    current = np.asarray(current, dtype=np.int64)
    load = np.asarray(load, dtype=np.float64)
    now = metrics.balance(metrics.dispatch(current, topology, load, source_load).gpu_load)
    if now >= threshold:
        return RebalanceDecision(
            False, f"balance {now:.3f} is at or above {threshold:.3f}", now, now, 0, None
        )
    plan = plan_experts(
        topology,
        load.shape[0],
        load.shape[1],
        load,
        source_load=source_load,
        previous=current,
        max_experts_moved=max_experts_moved,
        balance_slack=balance_slack,
    )
    planned = metrics.balance(metrics.dispatch(plan.phy2log, topology, load, source_load).gpu_load)
    if planned < now + min_gain:
        return RebalanceDecision(
            False,
            f"balance {now:.3f} is below {threshold:.3f} but the best plan within "
            f"{max_experts_moved} moves only reaches {planned:.3f}",
            now,
            planned,
            plan.experts_moved,
            None,
        )
    return RebalanceDecision(
        True,
        f"balance {now:.3f} below {threshold:.3f}; new plan reaches {planned:.3f} "
        f"moving {plan.experts_moved} experts",
        now,
        planned,
        plan.experts_moved,
        plan.phy2log,
    )
