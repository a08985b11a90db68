"""`llama4ctl plan ...`: placement planners on files.

`llama4ctl plan experts --input PROBLEM.json --output PLAN.json` reads a placement problem and
writes a placement. PROBLEM.json: `layers` (L), `experts` (E), `nodes` (N), `gpus_per_node` (g),
`slots_per_gpu` (s), `load` (L lists of E token counts; uniform when left out); optional
`source_load` (L x G x E, G = N x g), `previous` (L lists of P = G x s expert ids),
`expert_bytes` (one number, or E numbers), `gpu_memory_bytes`, `max_experts_moved`,
`balance_slack` (default 0.02, as `spec.placement.balanceSlack`).
PLAN.json: `phy2log` (L lists of P expert ids; slot p on GPU p // s, GPU q on node q // g) and
`figures` judged on the problem's `load` by `placement_metrics`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama4_operator.planners import eplb
from llama4_operator.planners import placement_metrics as metrics
from llama4_operator.planners.expert_placement import (
    DEFAULT_BALANCE_SLACK,
    linear_placement,
    plan_experts,
)

Algorithm = Literal["project", "eplb-global", "eplb-hierarchical", "linear"]


class PlacementProblem(BaseModel):
    """The contents of PROBLEM.json."""

    model_config = ConfigDict(extra="forbid")

    layers: int = Field(gt=0, description="MoE layers (L).")
    experts: int = Field(gt=0, description="Logical experts per layer (E).")
    nodes: int = Field(gt=0, description="Nodes (N).")
    gpus_per_node: int = Field(gt=0, description="GPUs per node (g).")
    slots_per_gpu: int = Field(gt=0, description="Expert slots per GPU per layer (s).")
    load: list[list[float]] | None = Field(
        default=None, description="L lists of E token counts; uniform when left out."
    )
    source_load: list[list[list[float]]] | None = Field(
        default=None, description="L x G x E token counts by the GPU the tokens come from."
    )
    previous: list[list[int]] | None = Field(
        default=None, description="The current placement: L lists of P expert ids."
    )
    expert_bytes: int | list[int] = Field(default=0, description="Bytes of one expert (or E).")
    gpu_memory_bytes: int | None = Field(default=None, gt=0)
    max_experts_moved: int | None = Field(default=None, ge=0)
    balance_slack: float = Field(
        default=DEFAULT_BALANCE_SLACK,
        ge=0.0,
        le=0.2,
        description="Layer balance the planner may give up for locality and fewer moves.",
    )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def slots(self) -> int:
        return self.gpus * self.slots_per_gpu

    @model_validator(mode="after")
    def _shapes(self) -> PlacementProblem:
        if self.slots < self.experts:
            raise ValueError(
                f"slots_per_gpu: nodes x gpus_per_node x slots_per_gpu = {self.slots} slots (P) "
                f"is fewer than experts = {self.experts}; raise slots_per_gpu to at least "
                f"{-(-self.experts // self.gpus)}"
            )
        if self.load is not None:
            _check_table("load", self.load, (self.layers, self.experts), "L lists of E counts")
        if self.source_load is not None:
            _check_table(
                "source_load",
                self.source_load,
                (self.layers, self.gpus, self.experts),
                "L x G x E counts",
            )
        if self.previous is not None:
            _check_table("previous", self.previous, (self.layers, self.slots), "L lists of P ids")
            for layer, row in enumerate(self.previous):
                if sorted(set(row)) != list(range(self.experts)):
                    raise ValueError(
                        f"previous[{layer}]: must hold only expert ids 0..{self.experts - 1}, "
                        "each at least once"
                    )
        if isinstance(self.expert_bytes, list) and len(self.expert_bytes) != self.experts:
            raise ValueError(f"expert_bytes: give one number or {self.experts} (one per expert)")
        if np.min(self.expert_bytes) < 0:
            raise ValueError("expert_bytes: must not be negative")
        return self


def _check_table(field: str, table: Any, shape: tuple[int, ...], words: str) -> None:
    """Nested lists of exactly `shape`, no negative values."""
    try:
        array = np.asarray(table, dtype=np.float64)
    except ValueError:
        array = None
    if array is None or array.shape != shape:
        found = "ragged lists" if array is None else f"shape {list(array.shape)}"
        raise ValueError(f"{field}: expected {words}, shape {list(shape)}; got {found}")
    if (array < 0).any():
        index = tuple(int(i) for i in np.argwhere(array < 0)[0])
        raise ValueError(f"{field}{list(index)}: counts must not be negative")


def solve(problem: PlacementProblem, algorithm: Algorithm) -> dict[str, Any]:
    """Plan `problem` with `algorithm`; return the PLAN.json document."""
    topology = metrics.Topology(problem.nodes, problem.gpus_per_node, problem.slots_per_gpu)
    load = (
        np.ones((problem.layers, problem.experts))
        if problem.load is None
        else np.asarray(problem.load, dtype=np.float64)
    )
    source = (
        None if problem.source_load is None else np.asarray(problem.source_load, dtype=np.float64)
    )
    previous = None if problem.previous is None else np.asarray(problem.previous, dtype=np.int64)
    expert_bytes: int | metrics.IntArray = (
        problem.expert_bytes
        if isinstance(problem.expert_bytes, int)
        else np.asarray(problem.expert_bytes, dtype=np.int64)
    )
    start = time.perf_counter()
    if algorithm == "project":
        phy2log = plan_experts(
            topology,
            problem.layers,
            problem.experts,
            None if problem.load is None else load,
            source_load=source,
            previous=previous,
            expert_bytes=expert_bytes,
            gpu_memory_bytes=problem.gpu_memory_bytes,
            max_experts_moved=problem.max_experts_moved,
            balance_slack=problem.balance_slack,
        ).phy2log
    elif algorithm == "eplb-global":
        phy2log = eplb.global_policy(load, topology)
    elif algorithm == "eplb-hierarchical":
        phy2log = eplb.hierarchical_policy(load, topology)
    else:
        phy2log = linear_placement(topology, problem.layers, problem.experts)
    elapsed_ms = (time.perf_counter() - start) * 1000
    figures = metrics.evaluate(
        phy2log,
        topology,
        load,
        source_load=source,
        previous=previous,
        expert_bytes=expert_bytes,
    )
    return {
        "phy2log": phy2log.tolist(),
        "algorithm": algorithm,
        "layers": problem.layers,
        "experts": problem.experts,
        "nodes": problem.nodes,
        "gpus_per_node": problem.gpus_per_node,
        "slots_per_gpu": problem.slots_per_gpu,
        "figures": {**figures.as_dict(), "planner_ms": round(elapsed_ms, 3)},
    }


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "PROBLEM.json is not valid:\n" + "\n".join(lines)


@click.group()
def plan() -> None:
    """Plan expert placements offline."""


@plan.command("experts")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PROBLEM.json: the placement problem.",
)
@click.option(
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="PLAN.json: where to write the placement.",
)
@click.option(
    "--algorithm",
    type=click.Choice(["project", "eplb-global", "eplb-hierarchical", "linear"]),
    default="project",
    show_default=True,
    help="The project's planner, a DeepSeek EPLB policy, or the contiguous layout.",
)
def experts(input_path: Path, output_path: Path, algorithm: Algorithm) -> None:
    """Place experts: read PROBLEM.json, write PLAN.json with phy2log and its figures."""
    try:
        raw = json.loads(input_path.read_text())
    except json.JSONDecodeError as error:
        raise click.ClickException(f"{input_path} is not JSON: {error}") from error
    try:
        problem = PlacementProblem.model_validate(raw)
    except ValidationError as error:
        raise click.ClickException(_describe(error)) from error
    try:
        document = solve(problem, algorithm)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    output_path.write_text(json.dumps(document))
    figures = document["figures"]
    click.echo(
        f"{algorithm}: balance {figures['balance']:.3f}, cross-node "
        f"{figures['cross_node_bytes'] / 1e9:.2f} GB, planned in {figures['planner_ms']:.1f} ms "
        f"-> {output_path}"
    )
