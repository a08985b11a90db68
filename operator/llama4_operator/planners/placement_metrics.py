"""How a placement of experts is judged, with the same rules for every planner.

The rules come from the project's reference on expert placement: a token on GPU q routed to
expert e goes to a copy on q if q holds one; else it is split evenly over the copies on q's node;
else evenly over all copies. Without per-source counts, tokens split evenly over all copies.
From that dispatch follow the balance of each layer (mean GPU load / max GPU load; over a model,
sum of means / sum of maxes, vLLM's "balancedness"), the cross-node traffic, the experts moved
from a previous placement, and the largest per-GPU expert memory. The benchmark, the CLI and the
operator's status all use these functions, so every figure the project prints means one thing.

Arrays: `phy2log` is [layers, slots] of expert ids, `load` [layers, experts] token counts,
`source_load` [layers, gpus, experts] token counts by the GPU the tokens come from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Llama 4 Scout and Maverick: hidden size 5120, activations in bf16 (2 bytes per element).
LLAMA4_TOKEN_BYTES = 5120 * 2


@dataclass(frozen=True)
class Topology:
    """The expert-parallel layout of one replica: slot p on GPU p // slots_per_gpu, GPU q on node
    q // gpus_per_node."""

    nodes: int
    gpus_per_node: int
    slots_per_gpu: int

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "slots_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def slots(self) -> int:
        return self.gpus * self.slots_per_gpu

    def gpu_of_slot(self) -> IntArray:
        return np.arange(self.slots, dtype=np.int64) // self.slots_per_gpu

    def node_of_gpu(self) -> IntArray:
        return np.arange(self.gpus, dtype=np.int64) // self.gpus_per_node


@dataclass(frozen=True)
class Dispatch:
    """Where a window's tokens land under the dispatch rule."""

    gpu_load: FloatArray  # [layers, gpus] tokens each GPU computes
    cross_node_tokens: FloatArray  # [layers] tokens sent to an expert on another node
    node_cross_tokens: FloatArray  # [layers, nodes] such tokens each node sends or receives


@dataclass(frozen=True)
class PlacementFigures:
    """The judging figures of one placement on one window."""

    balance: float
    cross_node_bytes: float
    busiest_node_cross_bytes: float
    max_gpu_expert_bytes: int
    experts_moved: int | None = None
    bytes_moved: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "balance": self.balance,
            "cross_node_bytes": self.cross_node_bytes,
            "busiest_node_cross_bytes": self.busiest_node_cross_bytes,
            "max_gpu_expert_bytes": self.max_gpu_expert_bytes,
            "experts_moved": self.experts_moved,
            "bytes_moved": self.bytes_moved,
        }


def copies_per_gpu(phy2log: IntArray, topology: Topology, experts: int) -> IntArray:
    """Count the copies of each expert on each GPU: [layers, experts, gpus]."""
    layers = phy2log.shape[0]
    gpu = np.broadcast_to(topology.gpu_of_slot(), phy2log.shape)
    layer = np.broadcast_to(np.arange(layers)[:, None], phy2log.shape)
    flat = (layer * experts + phy2log) * topology.gpus + gpu
    counts = np.bincount(flat.ravel(), minlength=layers * experts * topology.gpus)
    return counts.reshape(layers, experts, topology.gpus).astype(np.int64)


def _check_every_expert_placed(copies: IntArray) -> None:
    missing = np.argwhere(copies.sum(axis=2) == 0)
    if missing.size:
        layer, expert = (int(v) for v in missing[0])
        raise ValueError(
            f"phy2log[{layer}] holds no copy of expert {expert}: every expert must have a slot"
        )


def dispatch(
    phy2log: IntArray,
    topology: Topology,
    load: FloatArray,
    source_load: FloatArray | None = None,
) -> Dispatch:
    """Apply the dispatch rule to a window of token counts.

    Without `source_load`, tokens split evenly over all copies and, for the cross-node figure,
    are taken to come from every GPU alike.
    """
    experts = load.shape[1]
    copies = copies_per_gpu(phy2log, topology, experts).astype(np.float64)
    _check_every_expert_placed(copies.astype(np.int64))
    if source_load is None:
        source = np.broadcast_to(
            load[:, :, None] / topology.gpus, (*load.shape, topology.gpus)
        ).astype(np.float64)
        return _dispatch_from_sources(copies, source, topology, keep_local=False)
    return _dispatch_from_sources(
        copies, np.transpose(source_load, (0, 2, 1)).astype(np.float64), topology, keep_local=True
    )


def expert_arrival(
    copies: FloatArray, source: FloatArray, topology: Topology
) -> tuple[FloatArray, FloatArray]:
    """Tokens of each expert landing on each GPU when sources are known.

    `copies` and `source` are [layers, experts, gpus]; `source[l, e, q]` counts the tokens of
    expert e that GPU q sends. Returns the arrivals [layers, experts, gpus] and the tokens of each
    expert that leave their node [layers, experts, nodes] (by sending node).
    """
    layers, experts, _ = copies.shape
    nodes, per_node = topology.nodes, topology.gpus_per_node
    node_of = topology.node_of_gpu()
    total_copies = copies.sum(axis=2)
    node_copies = copies.reshape(layers, experts, nodes, per_node).sum(axis=3)
    node_has = (node_copies > 0)[:, :, node_of]
    on_gpu = copies > 0
    to_node = source * (~on_gpu & node_has)
    to_all = source * ~node_has
    node_pool = to_node.reshape(layers, experts, nodes, per_node).sum(axis=3)
    per_node_copy = np.divide(
        node_pool, node_copies, out=np.zeros_like(node_pool), where=node_copies > 0
    )
    arrival = source * on_gpu + per_node_copy[:, :, node_of] * copies
    arrival += (to_all.sum(axis=2) / total_copies)[:, :, None] * copies
    leaving = to_all.reshape(layers, experts, nodes, per_node).sum(axis=3)
    return arrival, leaving


def _dispatch_from_sources(
    copies: FloatArray, source: FloatArray, topology: Topology, *, keep_local: bool
) -> Dispatch:
    """`copies` and `source` are [layers, experts, gpus]; `source[l, e, q]` counts the tokens of
    expert e that GPU q sends."""
    layers, experts, _ = copies.shape
    nodes, per_node = topology.nodes, topology.gpus_per_node
    total_copies = copies.sum(axis=2)
    node_copies = copies.reshape(layers, experts, nodes, per_node).sum(axis=3)
    copy_share = node_copies / total_copies[:, :, None]
    if keep_local:
        arrival, leaving = expert_arrival(copies, source, topology)
        sent = leaving.sum(axis=1)
        # Tokens leaving their node spread over all copies; none of them is local.
        received = np.einsum("le,len->ln", leaving.sum(axis=2), copy_share)
        return Dispatch(arrival.sum(axis=1), sent.sum(axis=1), sent + received)
    totals = source.sum(axis=2)
    gpu_load = np.einsum("le,leg->lg", totals / total_copies, copies)
    node_source = source.reshape(layers, experts, nodes, per_node).sum(axis=3)
    sent = (node_source * (1.0 - copy_share)).sum(axis=1)
    # A node receives its share of the copies times the tokens of every other node.
    received = np.einsum("len,le->ln", copy_share, totals) - np.einsum(
        "len,len->ln", copy_share, node_source
    )
    return Dispatch(gpu_load, sent.sum(axis=1), sent + received)


def layer_balance(gpu_load: FloatArray) -> FloatArray:
    """Mean GPU load / max GPU load per layer (1.0 for a layer with no tokens)."""
    peak = gpu_load.max(axis=1)
    mean = gpu_load.mean(axis=1)
    result: FloatArray = np.divide(mean, peak, out=np.ones_like(mean), where=peak > 0)
    return result


def balance(gpu_load: FloatArray) -> float:
    """Balance over a model: sum of the layers' mean GPU loads / sum of their max loads."""
    peak = float(gpu_load.max(axis=1).sum())
    return 1.0 if peak == 0 else float(gpu_load.mean(axis=1).sum()) / peak


def experts_moved(previous: IntArray, current: IntArray, topology: Topology) -> int:
    """Copies a GPU must load because it did not hold that expert (in that number) before.

    Counted per GPU as a multiset difference, so reordering slots within a GPU is free; this never
    exceeds the number of slots whose expert changed, and equals it for a planner that keeps
    unchanged experts in their slots.
    """
    experts = int(max(previous.max(), current.max())) + 1
    before = copies_per_gpu(previous, topology, experts)
    after = copies_per_gpu(current, topology, experts)
    return int(np.clip(after - before, 0, None).sum())


def slots_changed(previous: IntArray, current: IntArray) -> int:
    """Slots whose expert differs from the previous placement."""
    return int((previous != current).sum())


def expert_bytes_per_slot(phy2log: IntArray, expert_bytes: int | IntArray) -> IntArray:
    """Bytes of the expert in each slot: [layers, slots]."""
    if isinstance(expert_bytes, int):
        return np.full(phy2log.shape, expert_bytes, dtype=np.int64)
    return np.asarray(expert_bytes, dtype=np.int64)[phy2log]


def max_gpu_expert_bytes(
    phy2log: IntArray, topology: Topology, expert_bytes: int | IntArray
) -> int:
    """The largest number of expert bytes any GPU holds, over all layers."""
    per_slot = expert_bytes_per_slot(phy2log, expert_bytes).sum(axis=0)
    return int(per_slot.reshape(topology.gpus, topology.slots_per_gpu).sum(axis=1).max())


def bytes_moved(
    previous: IntArray, current: IntArray, topology: Topology, expert_bytes: int | IntArray
) -> int:
    """Bytes of the copies counted by `experts_moved`."""
    experts = int(max(previous.max(), current.max())) + 1
    gained = np.clip(
        copies_per_gpu(current, topology, experts) - copies_per_gpu(previous, topology, experts),
        0,
        None,
    )
    if isinstance(expert_bytes, int):
        return int(gained.sum()) * expert_bytes
    return int((gained.sum(axis=2) * np.asarray(expert_bytes, dtype=np.int64)[None, :]).sum())


def evaluate(
    phy2log: IntArray,
    topology: Topology,
    load: FloatArray,
    *,
    source_load: FloatArray | None = None,
    previous: IntArray | None = None,
    expert_bytes: int | IntArray = 0,
    token_bytes: int = LLAMA4_TOKEN_BYTES,
) -> PlacementFigures:
    """All judging figures of `phy2log` on one window.

    Cross-node bytes count dispatch and combine (two transfers of `token_bytes` per token); the
    busiest node's figure is what crosses its network links in either direction.
    """
    result = dispatch(phy2log, topology, load, source_load)
    per_token = 2 * token_bytes
    return PlacementFigures(
        balance=balance(result.gpu_load),
        cross_node_bytes=float(result.cross_node_tokens.sum()) * per_token,
        busiest_node_cross_bytes=float(result.node_cross_tokens.sum(axis=0).max()) * per_token,
        max_gpu_expert_bytes=max_gpu_expert_bytes(phy2log, topology, expert_bytes),
        experts_moved=None if previous is None else experts_moved(previous, phy2log, topology),
        bytes_moved=(
            None if previous is None else bytes_moved(previous, phy2log, topology, expert_bytes)
        ),
    )
