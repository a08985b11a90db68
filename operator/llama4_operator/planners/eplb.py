"""DeepSeek's EPLB (expert-parallel load balancer), the baseline the project's planner is judged
against, written from the description in the project's reference (not from EPLB's source).

- Balanced packing: items sorted by weight, heaviest first; each goes to the lightest pack that
  still has room; every pack ends with the same number of items.
- Replication: the spare slots are handed out one at a time, each to the expert whose load per
  copy is then highest; load is taken to split evenly over an expert's copies.
- Global policy: replicate over all slots, then balanced-pack the copies (each weighing
  load / copies) onto the GPUs, `slots_per_gpu` per GPU. Nodes are ignored.
- Hierarchical policy (one expert per group, as for Llama 4): balanced-pack the experts onto the
  nodes, replicate within each node over its slots, balanced-pack each node's copies onto its GPUs.

Each layer is planned on its own; the previous placement is not looked at. Ties are broken towards
the lower index (a stable sort for "heaviest first", the first pack among equally light ones), so
results are deterministic and can be worked out by hand.
"""

from __future__ import annotations

import numpy as np

from llama4_operator.planners.placement_metrics import FloatArray, IntArray, Topology


def balanced_packing(weights: FloatArray, packs: int) -> tuple[IntArray, IntArray]:
    """Pack items onto `packs` packs of equal item count.

    Returns, per item, its pack and its position within the pack (order of arrival).
    """
    items = len(weights)
    if packs < 1 or items % packs:
        raise ValueError(f"{items} items cannot be split evenly over {packs} packs")
    per_pack = items // packs
    pack_of = np.empty(items, dtype=np.int64)
    rank_of = np.empty(items, dtype=np.int64)
    pack_load = [0.0] * packs
    pack_items = [0] * packs
    for item in np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable"):
        open_packs = [p for p in range(packs) if pack_items[p] < per_pack]
        lightest = min(open_packs, key=lambda p: pack_load[p])
        pack_of[item] = lightest
        rank_of[item] = pack_items[lightest]
        pack_load[lightest] += float(weights[item])
        pack_items[lightest] += 1
    return pack_of, rank_of


def replicate(load: FloatArray, physical: int) -> tuple[IntArray, IntArray]:
    """Spread `physical` copies over the experts of `load`.

    Returns the logical expert of each physical copy (the experts in order, then the spare copies
    in the order they were handed out) and the number of copies of each expert.
    """
    experts = len(load)
    if physical < experts:
        raise ValueError(f"{physical} slots cannot hold {experts} experts")
    counts = np.ones(experts, dtype=np.int64)
    phy_to_log = list(range(experts))
    weights = np.asarray(load, dtype=np.float64)
    for _ in range(physical - experts):
        hottest = int(np.argmax(weights / counts))
        counts[hottest] += 1
        phy_to_log.append(hottest)
    return np.asarray(phy_to_log, dtype=np.int64), counts


def _pack_copies_on_gpus(
    phy_to_log: IntArray, counts: IntArray, load: FloatArray, gpus: int, slots_per_gpu: int
) -> IntArray:
    """Balanced-pack copies onto GPUs; return the expert of each slot of these GPUs."""
    copy_weight = np.asarray(load, dtype=np.float64)[phy_to_log] / counts[phy_to_log]
    gpu_of, rank_of = balanced_packing(copy_weight, gpus)
    slots = np.empty(len(phy_to_log), dtype=np.int64)
    slots[gpu_of * slots_per_gpu + rank_of] = phy_to_log
    return slots


def _check(load: FloatArray, topology: Topology) -> None:
    if load.ndim != 2:
        raise ValueError("load must be [layers][experts]")
    if topology.slots < load.shape[1]:
        raise ValueError(f"{topology.slots} slots cannot hold {load.shape[1]} experts per layer")


def global_policy(load: FloatArray, topology: Topology) -> IntArray:
    """EPLB's global policy: phy2log [layers, slots]."""
    _check(load, topology)
    rows = []
    for layer_load in np.asarray(load, dtype=np.float64):
        phy_to_log, counts = replicate(layer_load, topology.slots)
        rows.append(
            _pack_copies_on_gpus(
                phy_to_log, counts, layer_load, topology.gpus, topology.slots_per_gpu
            )
        )
    return np.stack(rows)


def hierarchical_policy(load: FloatArray, topology: Topology) -> IntArray:
    """EPLB's hierarchical policy with one expert per group: phy2log [layers, slots]."""
    _check(load, topology)
    experts = load.shape[1]
    if experts % topology.nodes:
        raise ValueError(
            f"the hierarchical policy needs the {experts} experts to divide by the "
            f"{topology.nodes} nodes; use the global policy"
        )
    slots_per_node = topology.slots // topology.nodes
    rows = []
    for layer_load in np.asarray(load, dtype=np.float64):
        node_of, rank_of = balanced_packing(layer_load, topology.nodes)
        row = np.empty(topology.slots, dtype=np.int64)
        for node in range(topology.nodes):
            members = np.flatnonzero(node_of == node)
            members = members[np.argsort(rank_of[members], kind="stable")]
            local_load = layer_load[members]
            local_phy, counts = replicate(local_load, slots_per_node)
            local_slots = _pack_copies_on_gpus(
                local_phy, counts, local_load, topology.gpus_per_node, topology.slots_per_gpu
            )
            row[node * slots_per_node : (node + 1) * slots_per_node] = members[local_slots]
        rows.append(row)
    return np.stack(rows)
