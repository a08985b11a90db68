"""Expert parallelism for the reference engine: routed experts in Ray actors placed by the plan.

One `ExpertShard` actor stands for one GPU of the plan (`ExpertPlacement`): it holds, for every MoE
layer, the experts of that GPU's slots. Plan node i is the i-th Ray node offering the accelerator
resource (ordered by the node label `llama4.dev/ep-node`, then by address). Tokens go to a copy of
their expert on the engine's own GPU, else on its node, else anywhere, spread evenly over equally
close copies. A new plan is built beside the old one and swapped in between two engine steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llama4_serving.config import ExpertPlacement
from llama4_serving.engines.reference.experts import expert_ffn

logger = logging.getLogger(__name__)

NODE_ORDER_LABEL = "llama4.dev/ep-node"
SHARD_NAMESPACE = "llama4-serving"
SAME_GPU, SAME_NODE, ANY = 0, 1, 2


class ExpertParallelError(RuntimeError):
    """Shards could not be placed, or stopped answering."""


def slot_gpu(plan: ExpertPlacement, slot: int) -> int:
    return slot // plan.slots_per_gpu


def gpu_node(plan: ExpertPlacement, gpu: int) -> int:
    return gpu // plan.gpus_per_node


def choose_slots(
    plan: ExpertPlacement,
    moe_index: int,
    expert_ids: Sequence[int],
    home_gpu: int | None,
    home_node: int | None,
) -> list[int]:
    """The physical slot that serves each token: the closest copies of its expert, in turn."""
    row = plan.phy2log[moe_index]

    def distance(slot: int) -> int:
        gpu = slot_gpu(plan, slot)
        if gpu == home_gpu:
            return SAME_GPU
        return SAME_NODE if gpu_node(plan, gpu) == home_node else ANY

    closest: dict[int, list[int]] = {}
    for expert in set(expert_ids):
        copies = [slot for slot, held in enumerate(row) if held == expert]
        if not copies:
            raise ExpertParallelError(f"plan version {plan.version} holds no copy of {expert}")
        best = min(distance(s) for s in copies)
        closest[expert] = [s for s in copies if distance(s) == best]
    turn: dict[int, int] = dict.fromkeys(closest, 0)
    chosen = []
    for expert in expert_ids:
        copies = closest[expert]
        chosen.append(copies[turn[expert] % len(copies)])
        turn[expert] += 1
    return chosen


class MissingPlanVersionError(RuntimeError):
    """A shard was asked for a plan version it has not loaded (it restarted since)."""


SlotWeights = dict[int, tuple[np.ndarray, np.ndarray]]  # MoE index -> (gate_up, down) per slot


class ExpertShard:
    """The experts of one GPU of the plan, per plan version: a new plan is staged beside the
    current one on the same actor (the GPU stays held), then the old version is dropped."""

    def __init__(self, gpu: int, version: int, weights: SlotWeights) -> None:
        self.gpu = gpu
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.versions: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.stage(version, weights)

    def stage(self, version: int, weights: SlotWeights) -> None:
        # Copies: Ray hands out read-only views of the object store.
        self.versions[version] = {
            layer: (
                torch.tensor(gate_up, device=self.device),
                torch.tensor(down, device=self.device),
            )
            for layer, (gate_up, down) in weights.items()
        }

    def ensure(self, version: int, weights: SlotWeights) -> None:
        if version not in self.versions:
            self.stage(version, weights)

    def keep_only(self, version: int) -> None:
        self.versions = {version: self.versions[version]}

    def forward(
        self, version: int, moe_index: int, local_slots: np.ndarray, tokens: np.ndarray
    ) -> np.ndarray:
        if version not in self.versions:
            raise MissingPlanVersionError(f"GPU {self.gpu} holds no plan version {version}")
        gate_up, down = self.versions[version][moe_index]
        inputs = torch.from_numpy(tokens).to(self.device)
        slots = torch.from_numpy(local_slots).to(self.device)
        out = torch.zeros_like(inputs)
        with torch.inference_mode():
            for slot in torch.unique(slots).tolist():
                rows = (slots == slot).nonzero(as_tuple=True)[0]
                out[rows] = expert_ffn(inputs[rows], gate_up[slot], down[slot])
        result: np.ndarray = out.cpu().numpy()
        return result

    def info(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "gpu": self.gpu,
            "node_id": context.get_node_id(),
            "actor_id": context.get_actor_id(),
            "versions": sorted(self.versions),
        }


_ShardActor: Any = ray.remote(ExpertShard)


@dataclass
class _PlanState:
    plan: ExpertPlacement
    shards: list[Any]  # actor handles, one per GPU of the plan
    weight_refs: list[Any]  # this plan's slot weights per GPU, to reload a restarted shard
    node_ids: list[str]
    home_gpu: int | None
    home_node: int | None


def accelerator_nodes(resource: str, per_node: int) -> list[str]:
    """Alive Ray nodes with `per_node` of `resource`, in plan order."""
    nodes = [
        n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0) >= per_node
    ]

    def order(node: dict[str, Any]) -> tuple[int, str, str]:
        label = node.get("Labels", {}).get(NODE_ORDER_LABEL, "")
        rank = int(label) if label.isdigit() else 1 << 30
        return rank, node["NodeManagerAddress"], node["NodeID"]

    return [n["NodeID"] for n in sorted(nodes, key=order)]


class ShardedExperts:
    """An `ExpertBackend` whose experts run in `ExpertShard` actors laid out by a plan."""

    def __init__(
        self,
        expert_weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
        plan: ExpertPlacement,
        resource: str = "GPU",
        call_timeout_s: float = 60.0,
        max_restarts: int = 3,
    ) -> None:
        self._weights = [
            # float32: numpy has no bf16, and Ray ships numpy arrays without copying.
            (g.detach().float().cpu().numpy(), d.detach().float().cpu().numpy())
            for g, d in expert_weights
        ]
        self._resource = resource
        self._timeout = call_timeout_s
        self._max_restarts = max_restarts
        self._swap_lock = threading.Lock()
        # Creation arguments of live shards (handle -> weights): Ray needs them for a restart.
        self._creation_refs: dict[Any, Any] = {}
        self._state = self.prepare(plan)

    @property
    def plan(self) -> ExpertPlacement:
        return self._state.plan

    def prepare(self, plan: ExpertPlacement) -> _PlanState:
        """Load `plan` onto its shards while the current plan keeps serving: a GPU that the
        current plan already uses (same node) stages the new slots on its actor; others get
        a new actor."""
        if len(plan.phy2log) != len(self._weights):
            raise ExpertParallelError(
                f"the plan has {len(plan.phy2log)} MoE layer rows; the model has "
                f"{len(self._weights)} MoE layers"
            )
        node_ids = accelerator_nodes(self._resource, plan.gpus_per_node)
        if len(node_ids) < plan.nodes:
            raise ExpertParallelError(
                f"the plan needs {plan.nodes} Ray nodes with {plan.gpus_per_node} "
                f"{self._resource!r} each; the cluster has {len(node_ids)}: add nodes or "
                "replan for fewer"
            )
        node_ids = node_ids[: plan.nodes]
        here = ray.get_runtime_context().get_node_id()
        home_node = node_ids.index(here) if here in node_ids else None
        home_gpu = (
            home_node * plan.gpus_per_node
            if home_node is not None and torch.cuda.is_available()
            else None
        )
        current = getattr(self, "_state", None)
        # Named, so that operators (and tests) can find a shard with `ray.get_actor`.
        tag = uuid.uuid4().hex[:8]
        shards, refs, loads = [], [], []
        for gpu in range(plan.nodes * plan.gpus_per_node):
            ref = ray.put(self._slot_weights(plan, gpu))
            node_id = node_ids[gpu_node(plan, gpu)]
            reusable = (
                current is not None
                and gpu < len(current.shards)
                and current.node_ids[gpu_node(current.plan, gpu)] == node_id
            )
            if reusable:
                assert current is not None
                shard = current.shards[gpu]
                loads.append(shard.stage.remote(plan.version, ref))
            else:
                shard = self._start_shard(f"expert-shard-{tag}-gpu{gpu}", gpu, node_id, plan, ref)
                loads.append(shard.info.remote())
            shards.append(shard)
            refs.append(ref)
        state = _PlanState(plan, shards, refs, node_ids, home_gpu, home_node)
        try:
            ray.get(loads, timeout=self._timeout)
        except Exception as error:
            reused = set(current.shards if current else [])
            self._kill([s for s in shards if s not in reused])
            raise ExpertParallelError(
                f"expert shards of plan version {plan.version} did not load within "
                f"{self._timeout:.0f}s ({error}); check that the nodes have free "
                f"{self._resource!r}"
            ) from error
        return state

    def _slot_weights(self, plan: ExpertPlacement, gpu: int) -> SlotWeights:
        per_gpu = plan.slots_per_gpu
        weights: SlotWeights = {}
        for moe_index, row in enumerate(plan.phy2log):
            experts = row[gpu * per_gpu : (gpu + 1) * per_gpu]
            gate_up, down = self._weights[moe_index]
            weights[moe_index] = (gate_up[experts], down[experts])
        return weights

    def _start_shard(
        self, name: str, gpu: int, node_id: str, plan: ExpertPlacement, ref: Any
    ) -> Any:
        resources: dict[str, Any] = (
            {"num_gpus": 1} if self._resource == "GPU" else {"resources": {self._resource: 1}}
        )
        # A restarted actor runs __init__ again with these arguments (the ref stays alive in
        # the plan state); calls for a later plan version then restage it (see `run`).
        shard = _ShardActor.options(
            name=name,
            namespace=SHARD_NAMESPACE,
            num_cpus=0,
            max_restarts=self._max_restarts,
            max_task_retries=self._max_restarts,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **resources,
        ).remote(gpu, plan.version, ref)
        self._creation_refs[shard] = ref
        return shard

    def activate(
        self, state: _PlanState, between_steps: contextlib.AbstractContextManager[object]
    ) -> None:
        """Switch to a prepared plan while no step runs, then free the old plan's weights."""
        with between_steps:
            old, self._state = self._state, state
        kept = set(state.shards)
        self._kill([s for s in old.shards if s not in kept])
        for shard in state.shards:
            shard.keep_only.remote(state.plan.version)
        logger.info("expert plan version %d active", state.plan.version)

    def apply_plan(
        self, plan: ExpertPlacement, between_steps: contextlib.AbstractContextManager[object]
    ) -> None:
        with self._swap_lock:
            self.activate(self.prepare(plan), between_steps)

    def run(self, moe_index: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        state = self._state
        plan = state.plan
        slots = np.asarray(
            choose_slots(plan, moe_index, expert_ids.tolist(), state.home_gpu, state.home_node)
        )
        gpus = slots // plan.slots_per_gpu
        array = tokens.detach().float().cpu().numpy()
        groups = []
        for gpu in np.unique(gpus).tolist():
            rows = np.nonzero(gpus == gpu)[0]
            groups.append((gpu, rows, slots[rows] - gpu * plan.slots_per_gpu))
        for attempt in range(2):
            refs = [
                state.shards[gpu].forward.remote(plan.version, moe_index, local, array[rows])
                for gpu, rows, local in groups
            ]
            try:
                results = ray.get(refs, timeout=self._timeout)
                break
            except MissingPlanVersionError:
                if attempt:
                    raise
                # A shard restarted with the weights it was created with: load this plan again.
                ray.get(
                    [
                        state.shards[gpu].ensure.remote(plan.version, state.weight_refs[gpu])
                        for gpu, _, _ in groups
                    ],
                    timeout=self._timeout,
                )
            except Exception as error:
                raise ExpertParallelError(
                    f"an expert shard of MoE layer {moe_index} failed ({type(error).__name__}: "
                    f"{error}); the request cannot finish on plan version {plan.version}"
                ) from error
        out = np.zeros_like(array)
        for (_, rows, _), result in zip(groups, results, strict=True):
            out[rows] = result
        return torch.from_numpy(out).to(tokens.device, tokens.dtype)

    def shard_info(self) -> list[dict[str, Any]]:
        """Where each shard runs (gpu, node_id, actor_id), as the shards themselves report."""
        infos: list[dict[str, Any]] = ray.get(
            [s.info.remote() for s in self._state.shards], timeout=self._timeout
        )
        return infos

    def expected_nodes(self) -> list[str]:
        """The Ray node id each GPU of the current plan must run on."""
        plan = self._state.plan
        return [
            self._state.node_ids[gpu_node(plan, gpu)]
            for gpu in range(plan.nodes * plan.gpus_per_node)
        ]

    def shutdown(self) -> None:
        self._kill(self._state.shards)

    def _kill(self, shards: Sequence[Any]) -> None:
        for shard in shards:
            self._creation_refs.pop(shard, None)
            with contextlib.suppress(Exception):
                ray.kill(shard, no_restart=True)
