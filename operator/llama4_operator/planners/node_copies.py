"""How many copies of each expert each node holds, solved exactly as a small integer program.

The expert planner's greedy starts place copies one at a time, so they cannot see that keeping a
few cold experts on every node (and fewer copies of a hot one) sends far fewer tokens off their
node at the same balance. This module asks HiGHS (through `scipy.optimize.milp`) for the copies
per node that send the fewest tokens off their node, given:

- each node's slots are all used, at most one copy of an expert per GPU;
- every expert has a copy somewhere;
- no node computes more than `node_cap` tokens: its own tokens for the experts it holds, plus
  the tokens of nodes without a copy of such an expert (with two nodes all of them go to the
  other node; with more they are taken to spread evenly over the other nodes);
- no copy takes more than `copy_cap` tokens: its node's tokens for the expert split evenly over
  the node's copies, plus those of any one node without a copy.

The GPUs within a node, and the balance over drifted windows, are left to the planner, which
packs these counts onto GPUs, searches them, and judges them against its other candidates.

Variables: one binary per expert, node and copy count (0 to GPUs per node), exactly one of them
set, so every expression above is linear.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from llama4_operator.planners.placement_metrics import FloatArray, IntArray

# Stop within this share of the best possible: the program is a model of the dispatch rule, and
# the planner judges what it gives by the rule itself.
_GAP = 0.02


def node_copies(
    demand: FloatArray,
    gpus_per_node: int,
    slots_per_gpu: int,
    *,
    node_cap: float,
    copy_cap: float,
    time_limit: float,
) -> IntArray | None:
    """Copies of each expert per node ([experts, nodes]) that send the fewest of `demand`'s
    tokens ([experts, nodes], tokens each node sends to each expert) off their node, within the
    caps (see the module docstring). None when no plan within the caps was found in
    `time_limit` seconds."""
    experts, nodes = demand.shape
    counts = np.arange(gpus_per_node + 1)  # copies an expert may have on one node
    width = len(counts)
    # Variable (e, n, k) at index (e * nodes + n) * width + k.
    index = np.arange(experts * nodes * width).reshape(experts, nodes, width)
    variables = index.size
    rows: list[IntArray] = []
    cols: list[IntArray] = []
    values: list[FloatArray] = []
    lower: list[FloatArray] = []
    upper: list[FloatArray] = []
    row_count = 0

    def add(
        row: IntArray, col: IntArray, value: FloatArray, low: FloatArray, high: FloatArray
    ) -> None:
        nonlocal row_count
        rows.append(row + row_count)
        cols.append(col)
        values.append(value)
        lower.append(low)
        upper.append(high)
        row_count += len(low)

    pairs = experts * nodes
    # Exactly one copy count per expert and node.
    add(
        np.repeat(np.arange(pairs), width),
        index.ravel(),
        np.ones(pairs * width),
        np.ones(pairs),
        np.ones(pairs),
    )
    # Every expert on at least one node.
    add(
        np.repeat(np.arange(experts), nodes),
        index[:, :, 0].ravel(),
        np.ones(pairs),
        np.full(experts, -np.inf),
        np.full(experts, nodes - 1.0),
    )
    # Every slot of every node used.
    node_slots = float(gpus_per_node * slots_per_gpu)
    add(
        np.repeat(np.arange(nodes), experts * width),
        index.transpose(1, 0, 2).ravel(),
        np.tile(counts.astype(np.float64), nodes * experts),
        np.full(nodes, node_slots),
        np.full(nodes, node_slots),
    )
    # Node load: its own tokens for experts it holds plus its share of other nodes' tokens for
    # experts they lack = its total - own tokens of the experts it lacks + spill it receives.
    spill_share = 1.0 / max(nodes - 1, 1)
    for node in range(nodes):
        col = np.concatenate([index[:, node, 0], index[:, np.arange(nodes) != node, 0].ravel()])
        value = np.concatenate(
            [-demand[:, node], spill_share * demand[:, np.arange(nodes) != node].ravel()]
        )
        add(
            np.zeros(len(col), dtype=np.int64),
            col,
            value,
            np.array([-np.inf]),
            np.array([node_cap - float(demand[:, node].sum())]),
        )
    # Copy load: a count whose own share is over the cap is ruled out by its bound; one whose
    # share plus another node's spill is over the cap excludes that node lacking the expert.
    upper_bound = np.ones(experts * nodes * width)
    too_heavy = demand[:, :, None] / counts[None, None, 1:] > copy_cap
    upper_bound[index[:, :, 1:][too_heavy]] = 0.0
    for node in range(nodes):
        for other in range(nodes):
            if other == node:
                continue
            with_spill = (demand[:, node, None] + demand[:, other, None]) / counts[None, 1:]
            expert_ids, count_ids = np.nonzero((with_spill > copy_cap) & ~too_heavy[:, node, :])
            conflicts = len(expert_ids)
            if conflicts == 0:
                continue
            add(
                np.repeat(np.arange(conflicts), 2),
                np.stack(
                    [index[expert_ids, node, count_ids + 1], index[expert_ids, other, 0]], axis=1
                ).ravel(),
                np.ones(2 * conflicts),
                np.full(conflicts, -np.inf),
                np.ones(conflicts),
            )
    objective = np.zeros(variables)
    objective[index[:, :, 0].ravel()] = demand.ravel()
    integrality = np.ones(variables)
    matrix = coo_array(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(row_count, variables),
    ).tocsr()
    result = milp(
        objective,
        integrality=integrality,
        bounds=Bounds(np.zeros(variables), upper_bound),
        constraints=LinearConstraint(matrix, np.concatenate(lower), np.concatenate(upper)),
        options={"time_limit": time_limit, "mip_rel_gap": _GAP},
    )
    if result.x is None:
        return None
    chosen = np.round(result.x).reshape(experts, nodes, width)
    on_node: IntArray = (chosen * counts).sum(axis=2).astype(np.int64)
    return on_node
