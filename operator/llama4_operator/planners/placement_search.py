"""The expert planner's local search, compiled with numba.

One layer at a time: the search keeps each expert's dispatch (tokens landing on each GPU, tokens
leaving their node) and, for a move, recomputes only the two experts it touches, since the
dispatch rule treats every expert on its own (see `placement_metrics.expert_arrival`). Candidate
moves that unload the busiest GPU are estimated in bulk as if each copy's tokens moved with it,
and the best few are checked against the exact rule before one is taken:

- swap slot i of the busiest GPU with slot j of GPU q (two copies loaded);
- replace a copy on the busiest GPU, of an expert with spare copies, by a copy of another
  expert (one copy loaded).

It compiles once per machine (numba's on-disk cache) and runs as plain Python without numba (same
results, far slower).
"""

from __future__ import annotations

import numpy as np

from llama4_operator.planners.compiled import FloatArray, IntArray
from llama4_operator.planners.compiled import compiled as _compiled

_SWAP, _REPLACE = 0, 1


@_compiled
def expert_dispatch(
    expert: int,
    copies: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
    arrival: FloatArray,
    leaving: FloatArray,
) -> None:
    """Recompute `arrival[expert]` (tokens landing on each GPU) and `leaving[expert]` (tokens
    sent off their node) from the expert's copies, by the rule of `placement_metrics`."""
    gpus = copies.shape[1]
    total = 0
    for gpu in range(gpus):
        total += copies[expert, gpu]
    if not has_source:
        for gpu in range(gpus):
            arrival[expert, gpu] = load[expert] * copies[expert, gpu] / total
        leaving[expert] = 0.0
        return
    # GPUs of a node are consecutive (`Topology`): two passes over the nodes, no scratch arrays.
    per_node = gpus // nodes
    to_all = 0.0
    for node in range(nodes):
        node_copies, node_tokens = 0, 0.0
        for gpu in range(node * per_node, (node + 1) * per_node):
            node_copies += copies[expert, gpu]
            node_tokens += source[expert, gpu]
        if node_copies == 0:
            to_all += node_tokens
    spill = to_all / total
    for node in range(nodes):
        node_copies, pool = 0, 0.0
        for gpu in range(node * per_node, (node + 1) * per_node):
            node_copies += copies[expert, gpu]
            if copies[expert, gpu] == 0:
                pool += source[expert, gpu]
        for gpu in range(node * per_node, (node + 1) * per_node):
            held = copies[expert, gpu]
            if held > 0:
                arrival[expert, gpu] = source[expert, gpu] + held * (pool / node_copies + spill)
            else:
                arrival[expert, gpu] = 0.0
    leaving[expert] = to_all


@_compiled
def _insert(
    gains: FloatArray, kinds: IntArray, params: IntArray, gain: float, kind: int, a: int, b: int
) -> None:
    """Keep the best candidates in `gains` (sorted, best first)."""
    last = len(gains) - 1
    if gain <= gains[last]:
        return
    position = last
    while position > 0 and gains[position - 1] < gain:
        gains[position] = gains[position - 1]
        kinds[position] = kinds[position - 1]
        params[position, 0] = params[position - 1, 0]
        params[position, 1] = params[position - 1, 1]
        position -= 1
    gains[position] = gain
    kinds[position] = kind
    params[position, 0] = a
    params[position, 1] = b


@_compiled
def local_search(  # noqa: PLR0912, PLR0915
    slots: IntArray,
    copies: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
    stop_peak: float,
    budget: int,
    cross_cap: float,
    replacing: bool,
    max_steps: int,
    checked: int,
) -> tuple[int, float, float]:
    """Move copies off the busiest GPU until its load is at most `stop_peak`, no move helps, or
    `budget` copies have been loaded. A move is taken when the exact dispatch gives a lower
    peak (or the same peak with less spread) and no more tokens leave their node than
    `cross_cap` (or than before the move, if that is higher). `slots` [gpus, slots_per_gpu] and
    `copies` [experts, gpus] change in place. Returns the copies loaded, the busiest GPU's
    load and the tokens leaving their node at the end."""
    gpus, per_gpu = slots.shape
    experts = copies.shape[0]
    arrival = np.zeros((experts, gpus), dtype=np.float64)
    leaving = np.zeros(experts, dtype=np.float64)
    for expert in range(experts):
        expert_dispatch(expert, copies, source, load, has_source, node_of, nodes, arrival, leaving)
    gpu_load = np.zeros(gpus, dtype=np.float64)
    for expert in range(experts):
        for gpu in range(gpus):
            gpu_load[gpu] += arrival[expert, gpu]
    cross = leaving.sum()
    tolerance = 1e-9 * max(gpu_load.sum(), 1.0)
    totals = np.zeros(experts, dtype=np.int64)
    for expert in range(experts):
        totals[expert] = copies[expert].sum()
    gains = np.empty(checked, dtype=np.float64)
    kinds = np.zeros(checked, dtype=np.int64)
    params = np.zeros((checked, 2), dtype=np.int64)
    mine_weight = np.empty(per_gpu, dtype=np.float64)
    slot_weight = np.empty((gpus, per_gpu), dtype=np.float64)
    blocked = np.zeros((gpus, per_gpu), dtype=np.bool_)
    trial_load = np.empty(gpus, dtype=np.float64)
    saved = np.empty((2, gpus), dtype=np.float64)
    saved_leaving = np.empty(2, dtype=np.float64)
    moves = 0
    for _ in range(max_steps):
        busiest = int(np.argmax(gpu_load))
        peak = gpu_load[busiest]
        if peak <= stop_peak + tolerance or moves >= budget:
            break
        gains[:] = -np.inf
        # Tokens per copy in every slot, and whether the slot's expert is on the busiest GPU
        # already (it cannot swap in there), computed once per step for the inner loop.
        for gpu in range(gpus):
            for j in range(per_gpu):
                other = slots[gpu, j]
                slot_weight[gpu, j] = arrival[other, gpu] / copies[other, gpu]
                blocked[gpu, j] = copies[other, busiest] > 0
        for i in range(per_gpu):
            mine_weight[i] = slot_weight[busiest, i]
        for i in range(per_gpu):
            mine = slots[busiest, i]
            for q in range(gpus):
                if q == busiest or copies[mine, q] > 0:
                    continue
                room = peak - gpu_load[q]
                for j in range(per_gpu):
                    if blocked[q, j]:
                        continue
                    shifted = mine_weight[i] - slot_weight[q, j]
                    gain = min(shifted, room - shifted) / 2.0
                    if gain > gains[checked - 1]:
                        _insert(gains, kinds, params, gain, _SWAP, i, q * per_gpu + j)
        if replacing:
            for i in range(per_gpu):
                mine = slots[busiest, i]
                if totals[mine] < 2:
                    continue
                pushed = load[mine] / (totals[mine] - 1) - load[mine] / totals[mine]
                holders_after = -np.inf
                for gpu in range(gpus):
                    if gpu != busiest and copies[mine, gpu] > 0:
                        holders_after = max(holders_after, gpu_load[gpu] + pushed)
                for expert in range(experts):
                    if copies[expert, busiest] > 0:
                        continue
                    after = max(
                        peak - mine_weight[i] + load[expert] / (totals[expert] + 1), holders_after
                    )
                    if peak - after > gains[checked - 1]:
                        _insert(gains, kinds, params, peak - after, _REPLACE, i, expert)
        applied = False
        for rank in range(checked):
            gain = gains[rank]
            cost = 2 if kinds[rank] == _SWAP else 1
            if gain <= tolerance or moves + cost > budget:
                continue
            i = params[rank, 0]
            leaving_expert = slots[busiest, i]
            if kinds[rank] == _SWAP:
                q, j = divmod(params[rank, 1], per_gpu)
                arriving = slots[q, j]
                slots[busiest, i], slots[q, j] = arriving, leaving_expert
                copies[leaving_expert, busiest] -= 1
                copies[arriving, busiest] += 1
                copies[arriving, q] -= 1
                copies[leaving_expert, q] += 1
            else:
                q, j = -1, -1
                arriving = params[rank, 1]
                slots[busiest, i] = arriving
                copies[leaving_expert, busiest] -= 1
                copies[arriving, busiest] += 1
                totals[leaving_expert] -= 1
                totals[arriving] += 1
            changed = (leaving_expert, arriving)
            trial_load[:] = gpu_load
            trial_cross = cross
            for k in range(2):
                expert = changed[k]
                saved[k] = arrival[expert]
                saved_leaving[k] = leaving[expert]
                trial_load -= arrival[expert]
                trial_cross -= leaving[expert]
                expert_dispatch(
                    expert, copies, source, load, has_source, node_of, nodes, arrival, leaving
                )
                trial_load += arrival[expert]
                trial_cross += leaving[expert]
            new_peak = trial_load.max()
            better = False
            if trial_cross <= max(cross, cross_cap) + tolerance:
                if new_peak < peak - tolerance:
                    better = True
                elif new_peak <= peak + tolerance:
                    better = (trial_load**2).sum() < (gpu_load**2).sum() - tolerance * peak
            if better:
                gpu_load[:] = trial_load
                cross = trial_cross
                moves += cost
                applied = True
                break
            # Undo: restore the slots, copies and the two experts' dispatch.
            for k in range(1, -1, -1):
                arrival[changed[k]] = saved[k]
                leaving[changed[k]] = saved_leaving[k]
            if kinds[rank] == _SWAP:
                slots[busiest, i], slots[q, j] = leaving_expert, arriving
                copies[leaving_expert, busiest] += 1
                copies[arriving, busiest] -= 1
                copies[arriving, q] += 1
                copies[leaving_expert, q] -= 1
            else:
                slots[busiest, i] = leaving_expert
                copies[leaving_expert, busiest] += 1
                copies[arriving, busiest] -= 1
                totals[leaving_expert] += 1
                totals[arriving] -= 1
        if not applied:
            break
    return moves, gpu_load.max(), cross


@_compiled
def layer_dispatch(
    copies: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
) -> tuple[FloatArray, float]:
    """Tokens each GPU computes and tokens leaving their node, for one layer's `copies`."""
    experts, gpus = copies.shape
    arrival = np.zeros((experts, gpus), dtype=np.float64)
    leaving = np.zeros(experts, dtype=np.float64)
    gpu_load = np.zeros(gpus, dtype=np.float64)
    for expert in range(experts):
        expert_dispatch(expert, copies, source, load, has_source, node_of, nodes, arrival, leaving)
        for gpu in range(gpus):
            gpu_load[gpu] += arrival[expert, gpu]
    return gpu_load, leaving.sum()


@_compiled
def drifted_peak(  # noqa: PLR0912
    copies: IntArray, drifted: FloatArray, node_tokens: FloatArray, node_of: IntArray, nodes: int
) -> float:
    """The busiest GPU's share of the tokens under the source rule, averaged over windows:
    `drifted[w, e, q]` is the tokens GPU q sends to expert e in window w, `node_tokens[w, e, n]`
    their sum over node n's GPUs. Only the GPUs holding an expert are visited, which makes this
    an order of magnitude faster than `layer_dispatch` per window."""
    windows, experts, gpus = drifted.shape
    node_copies = np.zeros((experts, nodes), dtype=np.int64)
    total = np.zeros(experts, dtype=np.int64)
    first_holder = np.zeros(experts + 1, dtype=np.int64)
    for expert in range(experts):
        first_holder[expert + 1] = first_holder[expert]
        for gpu in range(gpus):
            if copies[expert, gpu] > 0:
                first_holder[expert + 1] += 1
                node_copies[expert, node_of[gpu]] += copies[expert, gpu]
                total[expert] += copies[expert, gpu]
    holders = np.empty(first_holder[experts], dtype=np.int64)
    for expert in range(experts):
        position = first_holder[expert]
        for gpu in range(gpus):
            if copies[expert, gpu] > 0:
                holders[position] = gpu
                position += 1
    gpu_load = np.zeros(gpus, dtype=np.float64)
    pool = np.zeros(nodes, dtype=np.float64)
    share = 0.0
    for window in range(windows):
        gpu_load[:] = 0.0
        for expert in range(experts):
            to_all = 0.0
            for node in range(nodes):
                pool[node] = node_tokens[window, expert, node]
                if node_copies[expert, node] == 0:
                    to_all += pool[node]
            for index in range(first_holder[expert], first_holder[expert + 1]):
                gpu = holders[index]
                pool[node_of[gpu]] -= drifted[window, expert, gpu]
            spill = to_all / total[expert]
            for index in range(first_holder[expert], first_holder[expert + 1]):
                gpu = holders[index]
                node = node_of[gpu]
                gpu_load[gpu] += drifted[window, expert, gpu] + copies[expert, gpu] * (
                    pool[node] / node_copies[expert, node] + spill
                )
        tokens = gpu_load.sum()
        if tokens > 0:
            share += gpu_load.max() / tokens
    return float(share / windows)


@_compiled
def repair_counts(
    slots: IntArray,
    copies: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
    counts: IntArray,
    order: IntArray,
    budget: int,
) -> int:
    """Give each expert (in `order`) the number of copies `counts` asks for, one replaced copy
    per move: the copy replaced is one of an expert with copies to spare, on the busiest GPU
    that lacks the expert in deficit. `slots` and `copies` change in place; returns the moves."""
    gpus, per_gpu = slots.shape
    experts = copies.shape[0]
    arrival = np.zeros((experts, gpus), dtype=np.float64)
    leaving = np.zeros(experts, dtype=np.float64)
    gpu_load = np.zeros(gpus, dtype=np.float64)
    totals = np.zeros(experts, dtype=np.int64)
    for expert in range(experts):
        expert_dispatch(expert, copies, source, load, has_source, node_of, nodes, arrival, leaving)
        totals[expert] = copies[expert].sum()
        for gpu in range(gpus):
            gpu_load[gpu] += arrival[expert, gpu]
    moves = 0
    for expert in order:
        while totals[expert] < counts[expert] and moves < budget:
            best_gpu, best_slot, best_load = -1, -1, -np.inf
            for gpu in range(gpus):
                if copies[expert, gpu] > 0 or gpu_load[gpu] <= best_load:
                    continue
                for slot in range(per_gpu):
                    held = slots[gpu, slot]
                    if totals[held] > counts[held]:
                        best_gpu, best_slot, best_load = gpu, slot, gpu_load[gpu]
                        break
            if best_gpu < 0:
                break
            replaced = slots[best_gpu, best_slot]
            slots[best_gpu, best_slot] = expert
            copies[replaced, best_gpu] -= 1
            copies[expert, best_gpu] += 1
            totals[replaced] -= 1
            totals[expert] += 1
            for changed in (replaced, expert):
                gpu_load -= arrival[changed]
                expert_dispatch(
                    changed, copies, source, load, has_source, node_of, nodes, arrival, leaving
                )
                gpu_load += arrival[changed]
            moves += 1
    return moves


# Flat loops on purpose here and in `local_search`: numba compiles them to tight machine code, and
# helpers would pass a dozen arrays around for no clarity gained.
@_compiled
def construct_near_sources(  # noqa: PLR0912
    load: FloatArray,
    counts: IntArray,
    demand: FloatArray,
    order: IntArray,
    gpus_per_node: int,
    per_gpu: int,
    node_slack: float,
) -> IntArray:
    """Greedy placement, copies in `order`: each copy goes to the node that sends its expert
    the most tokens per copy there (a node without a copy first) while that node is under its
    share of the load plus `node_slack`, else to the least loaded node; within the node, to the
    least loaded GPU that lacks the expert (a duplicate only when every open GPU holds it).
    `demand` is [experts, nodes]. Returns slots [gpus, per_gpu]."""
    experts, nodes = demand.shape
    gpus = nodes * gpus_per_node
    slots = np.full((gpus, per_gpu), -1, dtype=np.int64)
    filled = np.zeros(gpus, dtype=np.int64)
    held = np.zeros((experts, gpus), dtype=np.int64)
    gpu_load = np.zeros(gpus, dtype=np.float64)
    node_load = np.zeros(nodes, dtype=np.float64)
    node_cap = load.sum() / nodes * (1.0 + node_slack)
    on_node = np.zeros(nodes, dtype=np.int64)
    node_open = np.zeros(nodes, dtype=np.bool_)
    for expert in order:
        per_copy = load[expert] / counts[expert]
        on_node[:] = 0
        for _ in range(counts[expert]):
            chosen_node, chosen_gpu = -1, -1
            for allow_duplicate in (False, True):
                any_open = False
                for node in range(nodes):
                    node_open[node] = False
                    for gpu in range(node * gpus_per_node, (node + 1) * gpus_per_node):
                        if filled[gpu] < per_gpu and (allow_duplicate or held[expert, gpu] == 0):
                            node_open[node] = True
                            any_open = True
                            break
                if not any_open:
                    continue
                any_under = False
                for node in range(nodes):
                    if node_open[node] and node_load[node] < node_cap:
                        any_under = True
                # Candidates: open nodes (under the cap if any is), preferring ones without a copy.
                any_fresh = False
                for node in range(nodes):
                    if (
                        node_open[node]
                        and (node_load[node] < node_cap or not any_under)
                        and on_node[node] == 0
                    ):
                        any_fresh = True
                best_value = -np.inf
                for node in range(nodes):
                    if not node_open[node] or (any_under and node_load[node] >= node_cap):
                        continue
                    if any_fresh and on_node[node] != 0:
                        continue
                    if any_under:
                        value = demand[expert, node] / (1 + on_node[node])
                        if value > best_value:
                            best_value, chosen_node = value, node
                    elif chosen_node < 0 or node_load[node] < node_load[chosen_node]:
                        chosen_node = node
                lightest = np.inf
                for gpu in range(chosen_node * gpus_per_node, (chosen_node + 1) * gpus_per_node):
                    if (
                        filled[gpu] < per_gpu
                        and (allow_duplicate or held[expert, gpu] == 0)
                        and gpu_load[gpu] < lightest
                    ):
                        lightest, chosen_gpu = gpu_load[gpu], gpu
                break
            slots[chosen_gpu, filled[chosen_gpu]] = expert
            filled[chosen_gpu] += 1
            held[expert, chosen_gpu] += 1
            gpu_load[chosen_gpu] += per_copy
            node_load[chosen_node] += per_copy
            on_node[chosen_node] += 1
    return slots


@_compiled
def pack_nodes(on_node: IntArray, weight: FloatArray, gpus_per_node: int, per_gpu: int) -> IntArray:
    """Pack each node's copies (`on_node` [experts, nodes] copies, each weighing
    `weight[expert, node]`) onto its GPUs, heaviest first (ties to the lower expert id), each on
    the least loaded GPU with room that lacks the expert (any GPU with room when all hold it).
    Returns slots [gpus, per_gpu]."""
    experts, nodes = on_node.shape
    slots = np.full((nodes * gpus_per_node, per_gpu), -1, dtype=np.int64)
    for node in range(nodes):
        count = on_node[:, node].sum()
        items = np.empty(count, dtype=np.int64)
        item_weight = np.empty(count, dtype=np.float64)
        position = 0
        for expert in range(experts):
            for _ in range(on_node[expert, node]):
                items[position] = expert
                item_weight[position] = -weight[expert, node]
                position += 1
        ranked = np.argsort(item_weight, kind="mergesort")
        filled = np.zeros(gpus_per_node, dtype=np.int64)
        gpu_load = np.zeros(gpus_per_node, dtype=np.float64)
        base = node * gpus_per_node
        for index in ranked:
            expert = items[index]
            chosen, chosen_lacking = -1, False
            for gpu in range(gpus_per_node):
                if filled[gpu] >= per_gpu:
                    continue
                lacking = True
                for slot in range(filled[gpu]):
                    if slots[base + gpu, slot] == expert:
                        lacking = False
                        break
                if (
                    chosen < 0
                    or (lacking and not chosen_lacking)
                    or (lacking == chosen_lacking and gpu_load[gpu] < gpu_load[chosen])
                ):
                    chosen, chosen_lacking = gpu, lacking
            slots[base + chosen, filled[chosen]] = expert
            filled[chosen] += 1
            gpu_load[chosen] -= item_weight[index]
    return slots


@_compiled
def _balanced_packing(weights: FloatArray, packs: int) -> tuple[IntArray, IntArray]:
    """EPLB's balanced packing (see `eplb.balanced_packing`): heaviest first onto the lightest
    pack with room, equal item counts; returns each item's pack and rank in it."""
    items = len(weights)
    per_pack = items // packs
    pack_of = np.empty(items, dtype=np.int64)
    rank_of = np.empty(items, dtype=np.int64)
    pack_load = np.zeros(packs, dtype=np.float64)
    pack_items = np.zeros(packs, dtype=np.int64)
    for item in np.argsort(-weights, kind="mergesort"):
        lightest = -1
        for pack in range(packs):
            if pack_items[pack] < per_pack and (
                lightest < 0 or pack_load[pack] < pack_load[lightest]
            ):
                lightest = pack
        pack_of[item] = lightest
        rank_of[item] = pack_items[lightest]
        pack_load[lightest] += weights[item]
        pack_items[lightest] += 1
    return pack_of, rank_of


@_compiled
def hierarchical_start(load: FloatArray, nodes: int, gpus_per_node: int, per_gpu: int) -> IntArray:
    """EPLB's hierarchical policy with one expert per group (see `eplb.hierarchical_policy`) for
    one layer: experts packed onto nodes, replicated within each node, each node's copies packed
    onto its GPUs. Returns slots [gpus, per_gpu]."""
    experts = len(load)
    slots_per_node = gpus_per_node * per_gpu
    node_of, rank_of = _balanced_packing(load, nodes)
    row = np.empty(nodes * slots_per_node, dtype=np.int64)
    members_per_node = experts // nodes
    for node in range(nodes):
        members = np.empty(members_per_node, dtype=np.int64)
        for expert in range(experts):
            if node_of[expert] == node:
                members[rank_of[expert]] = expert
        local_load = load[members]
        counts = np.ones(members_per_node, dtype=np.int64)
        phy = np.empty(slots_per_node, dtype=np.int64)
        phy[:members_per_node] = np.arange(members_per_node)
        for spare in range(members_per_node, slots_per_node):
            hottest = 0
            for member in range(1, members_per_node):
                if local_load[member] / counts[member] > local_load[hottest] / counts[hottest]:
                    hottest = member
            counts[hottest] += 1
            phy[spare] = hottest
        weights = np.empty(slots_per_node, dtype=np.float64)
        for index in range(slots_per_node):
            weights[index] = local_load[phy[index]] / counts[phy[index]]
        gpu_of, rank_in_gpu = _balanced_packing(weights, gpus_per_node)
        for index in range(slots_per_node):
            slot = node * slots_per_node + gpu_of[index] * per_gpu + rank_in_gpu[index]
            row[slot] = members[phy[index]]
    return row.reshape(nodes * gpus_per_node, per_gpu)


@_compiled
def share_by_node_demand(
    load: FloatArray, counts: IntArray, demand: FloatArray, slots_per_node: int, gpus_per_node: int
) -> IntArray:
    """Copies of each expert per node ([experts, nodes]), shared out by the nodes' demand
    (`demand` [experts, nodes]): each expert's first copy, heaviest experts first, on the node
    that sends it the most tokens and has room; every further copy where the expert's tokens
    per copy are highest (`demand / (copies there + 1)`, ties to the lower expert, then node),
    at most one per GPU of a node; copies left over on any node with room."""
    experts, nodes = demand.shape
    free = np.full(nodes, slots_per_node, dtype=np.int64)
    on_node = np.zeros((experts, nodes), dtype=np.int64)
    for expert in np.argsort(-load, kind="mergesort"):
        for node in np.argsort(-demand[expert], kind="mergesort"):
            if free[node] > 0:
                on_node[expert, node] += 1
                free[node] -= 1
                break
    left = counts - 1
    while True:
        best_value, best_expert, best_node = -np.inf, -1, -1
        for expert in range(experts):
            if left[expert] == 0:
                continue
            for node in range(nodes):
                if free[node] == 0 or on_node[expert, node] >= gpus_per_node:
                    continue
                value = demand[expert, node] / (1 + on_node[expert, node])
                if value > best_value:
                    best_value, best_expert, best_node = value, expert, node
        if best_expert < 0:
            break
        on_node[best_expert, best_node] += 1
        free[best_node] -= 1
        left[best_expert] -= 1
    for expert in range(experts):
        for node in range(nodes):
            take = min(left[expert], free[node])
            on_node[expert, node] += take
            free[node] -= take
            left[expert] -= take
    return on_node


@_compiled
def _redispatch(
    experts_changed: IntArray,
    copies: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
    arrival: FloatArray,
    leaving: FloatArray,
    gpu_load: FloatArray,
) -> None:
    """Bring `arrival`, `leaving` and `gpu_load` up to date after `experts_changed` moved."""
    for expert in experts_changed:
        gpu_load -= arrival[expert]
        expert_dispatch(expert, copies, source, load, has_source, node_of, nodes, arrival, leaving)
        gpu_load += arrival[expert]


@_compiled
def undo_moves(  # noqa: PLR0912, PLR0915
    slots: IntArray,
    copies: IntArray,
    before: IntArray,
    source: FloatArray,
    load: FloatArray,
    has_source: bool,
    node_of: IntArray,
    nodes: int,
    peak_cap: float,
    cross_cap: float,
) -> int:
    """Take back copies a plan loads onto GPUs, while the busiest GPU stays at most `peak_cap`
    and the tokens leaving their node at most `cross_cap` (or no worse than they were, when
    above). On a GPU that holds a copy it did not hold before (`before` [experts, gpus], the
    previous placement's copies), an expert the GPU lost is put back: swapped with a GPU that
    gained that expert and lost the other (two copies taken back), or alone when the replaced
    expert keeps a copy elsewhere (one). `slots` and `copies` change in place; returns the
    copies taken back."""
    gpus, per_gpu = slots.shape
    experts = copies.shape[0]
    arrival = np.zeros((experts, gpus), dtype=np.float64)
    leaving = np.zeros(experts, dtype=np.float64)
    gpu_load = np.zeros(gpus, dtype=np.float64)
    totals = np.zeros(experts, dtype=np.int64)
    for expert in range(experts):
        expert_dispatch(expert, copies, source, load, has_source, node_of, nodes, arrival, leaving)
        totals[expert] = copies[expert].sum()
        gpu_load += arrival[expert]
    pair = np.empty(2, dtype=np.int64)
    undone = 0
    changed = True
    while changed:
        changed = False
        for gpu in range(gpus):
            for slot in range(per_gpu):
                gained = slots[gpu, slot]
                if copies[gained, gpu] <= before[gained, gpu]:
                    continue
                for lost in range(experts):
                    if before[lost, gpu] <= copies[lost, gpu]:
                        continue
                    peak_before = max(gpu_load.max(), peak_cap)
                    cross_before = max(leaving.sum(), cross_cap)
                    pair[0], pair[1] = gained, lost
                    taken = 0
                    for other in range(gpus):
                        if (
                            other == gpu
                            or copies[lost, other] <= before[lost, other]
                            or before[gained, other] <= copies[gained, other]
                        ):
                            continue
                        other_slot = 0
                        while slots[other, other_slot] != lost:
                            other_slot += 1
                        slots[gpu, slot], slots[other, other_slot] = lost, gained
                        copies[gained, gpu] -= 1
                        copies[lost, gpu] += 1
                        copies[lost, other] -= 1
                        copies[gained, other] += 1
                        _redispatch(
                            pair, copies, source, load, has_source, node_of, nodes,
                            arrival, leaving, gpu_load,
                        )  # fmt: skip
                        if gpu_load.max() <= peak_before and leaving.sum() <= cross_before:
                            taken = 2
                            break
                        slots[gpu, slot], slots[other, other_slot] = gained, lost
                        copies[gained, gpu] += 1
                        copies[lost, gpu] -= 1
                        copies[lost, other] += 1
                        copies[gained, other] -= 1
                        _redispatch(
                            pair, copies, source, load, has_source, node_of, nodes,
                            arrival, leaving, gpu_load,
                        )  # fmt: skip
                    if taken == 0 and totals[gained] > 1:
                        slots[gpu, slot] = lost
                        copies[gained, gpu] -= 1
                        copies[lost, gpu] += 1
                        _redispatch(
                            pair, copies, source, load, has_source, node_of, nodes,
                            arrival, leaving, gpu_load,
                        )  # fmt: skip
                        if gpu_load.max() <= peak_before and leaving.sum() <= cross_before:
                            totals[gained] -= 1
                            totals[lost] += 1
                            taken = 1
                        else:
                            slots[gpu, slot] = gained
                            copies[gained, gpu] += 1
                            copies[lost, gpu] -= 1
                            _redispatch(
                                pair, copies, source, load, has_source, node_of, nodes,
                                arrival, leaving, gpu_load,
                            )  # fmt: skip
                    if taken:
                        undone += taken
                        changed = True
                        break
    return undone


@_compiled
def global_start(load: FloatArray, counts: IntArray, gpus: int, per_gpu: int) -> IntArray:
    """EPLB's global policy (see `eplb.global_policy`) for one layer, given the copies of each
    expert: the copies, each weighing load / copies, balanced-packed onto the GPUs (equal up to
    ties between copies of different experts that weigh the same). Returns slots
    [gpus, per_gpu]."""
    experts = len(load)
    items = counts.sum()
    expert_of = np.empty(items, dtype=np.int64)
    weights = np.empty(items, dtype=np.float64)
    position = 0
    for expert in range(experts):
        for _ in range(counts[expert]):
            expert_of[position] = expert
            weights[position] = load[expert] / counts[expert]
            position += 1
    gpu_of, rank_of = _balanced_packing(weights, gpus)
    slots = np.empty((gpus, per_gpu), dtype=np.int64)
    for item in range(items):
        slots[gpu_of[item], rank_of[item]] = expert_of[item]
    return slots
