"""Expert placement benchmark: linear, EPLB global, EPLB hierarchical and the project's planner,
side by side on the same seeded loads, judged by `llama4_operator.planners.placement_metrics`.

Run: .venv/bin/python benchmarks/placement/run.py   (see README.md in this folder)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import Windows, by_domain, skewed

from llama4_operator.planners import eplb
from llama4_operator.planners import placement_metrics as metrics
from llama4_operator.planners.expert_placement import linear_placement, plan_experts

# Llama 4 routed expert: gate, up and down projections, hidden 5120 x intermediate 8192, bf16.
EXPERT_BYTES = 3 * 5120 * 8192 * 2
GB = 1e9
GIB = 2**30

MODELS = {"Scout": (48, 16), "Maverick": (24, 128)}
SHAPES = [("Scout", 1), ("Scout", 2), ("Maverick", 1), ("Maverick", 2), ("Maverick", 4)]
GPUS_PER_NODE = 8
ZIPF_EXPONENTS = (0.6, 1.0, 1.4)
DOMAIN_EXPONENT = 1.0

Planner = Callable[[metrics.Topology, np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def _linear(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return linear_placement(topology, load.shape[0], load.shape[1])


def _eplb_global(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return eplb.global_policy(load, topology)


def _eplb_hierarchical(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return eplb.hierarchical_policy(load, topology)


def _project(
    topology: metrics.Topology,
    load: np.ndarray,
    source: np.ndarray | None,
    previous: np.ndarray | None,
) -> np.ndarray:
    plan = plan_experts(
        topology, load.shape[0], load.shape[1], load, source_load=source, previous=previous
    )
    return plan.phy2log


PLANNERS: dict[str, Planner] = {
    "linear": _linear,
    "eplb-global": _eplb_global,
    "eplb-hierarchical": _eplb_hierarchical,
    "project": _project,
}


@dataclass(frozen=True)
class Row:
    balance_planning: float
    balance_next: float
    cross_gb: float
    busiest_gb: float
    moved: int
    max_gpu_gib: float
    ms: float


def run_planner(planner: Planner, topology: metrics.Topology, windows: Windows) -> Row:
    """Plan from the `before` window, re-plan from the `planning` window with that plan as the
    previous placement (timed), and judge the re-plan on the planning and next windows."""
    before, planning, upcoming = windows.load
    sources = windows.source or (None, None, None)
    first = planner(topology, before, sources[0], None)
    start = time.process_time()
    second = planner(topology, planning, sources[1], first)
    elapsed = (time.process_time() - start) * 1000
    on_planning = metrics.evaluate(second, topology, planning, source_load=sources[1])
    on_next = metrics.evaluate(
        second,
        topology,
        upcoming,
        source_load=sources[2],
        previous=first,
        expert_bytes=EXPERT_BYTES,
    )
    return Row(
        balance_planning=on_planning.balance,
        balance_next=on_next.balance,
        cross_gb=on_next.cross_node_bytes / GB,
        busiest_gb=on_next.busiest_node_cross_bytes / GB,
        moved=on_next.experts_moved or 0,
        max_gpu_gib=on_next.max_gpu_expert_bytes / GIB,
        ms=elapsed,
    )


def targets(
    rows: dict[str, Row], nodes: int, has_sources: bool, timed: bool
) -> list[tuple[str, bool, str]]:
    """The issue's targets for one case, against the better of the two EPLB policies."""
    ours = rows["project"]
    eplb_rows = [rows["eplb-global"], rows["eplb-hierarchical"]]
    best_next = max(row.balance_next for row in eplb_rows)
    fewest_moved = min(row.moved for row in eplb_rows)
    checks = [
        (
            "next-window balance >= EPLB - 0.01",
            ours.balance_next >= best_next - 0.01,
            f"{ours.balance_next:.3f} vs {best_next:.3f}",
        ),
        (
            "moves <= 0.25x EPLB at equal or better next-window balance",
            ours.moved <= 0.25 * fewest_moved and ours.balance_next >= best_next,
            f"{ours.moved} vs {fewest_moved} ({ours.moved / max(fewest_moved, 1):.2f}x), "
            f"balance {ours.balance_next:.3f} vs {best_next:.3f}",
        ),
    ]
    if has_sources and nodes > 1:
        least_cross = min(row.cross_gb for row in eplb_rows)
        checks.append(
            (
                "cross-node bytes <= 0.75x EPLB",
                ours.cross_gb <= 0.75 * least_cross,
                f"{ours.cross_gb:.2f} vs {least_cross:.2f} GB "
                f"({ours.cross_gb / max(least_cross, 1e-12):.2f}x)",
            )
        )
    if timed:
        checks.append(("<= 100 ms per plan", ours.ms <= 100.0, f"{ours.ms:.1f} ms"))
    return checks


def cases() -> list[tuple[str, str, int, int, Windows]]:
    """(label, model, nodes, redundant slots, windows) for every case, seeded by its position."""
    result = []
    seed = 0
    for model, nodes in SHAPES:
        layers, experts = MODELS[model]
        gpus = nodes * GPUS_PER_NODE
        for redundant in (0, gpus, 2 * gpus):
            for exponent in ZIPF_EXPONENTS:
                seed += 1
                result.append(
                    (
                        f"zipf {exponent}",
                        model,
                        nodes,
                        redundant,
                        skewed(seed, layers, experts, gpus, exponent),
                    )
                )
            seed += 1
            result.append(
                (
                    f"domains (zipf {DOMAIN_EXPONENT})",
                    model,
                    nodes,
                    redundant,
                    by_domain(
                        seed,
                        layers,
                        experts,
                        nodes=nodes,
                        gpus_per_node=GPUS_PER_NODE,
                        exponent=DOMAIN_EXPONENT,
                    ),
                )
            )
    return result


def main() -> int:
    started = time.perf_counter()
    tally: dict[str, list[bool]] = {}
    misses: list[str] = []
    header = (
        f"{'planner':<18} {'bal plan':>8} {'bal next':>8} {'xnode GB':>9} {'busiest GB':>10} "
        f"{'moved':>6} {'max GPU GiB':>11} {'ms':>7}"
    )
    for label, model, nodes, redundant, windows in cases():
        layers, experts = MODELS[model]
        gpus = nodes * GPUS_PER_NODE
        topology = metrics.Topology(nodes, GPUS_PER_NODE, (experts + redundant) // gpus)
        name = (
            f"{model} {layers}x{experts} on {nodes}x{GPUS_PER_NODE}, {redundant} redundant, {label}"
        )
        print(f"\n== {name}")
        print(header)
        rows = {key: run_planner(planner, topology, windows) for key, planner in PLANNERS.items()}
        for key, row in rows.items():
            print(
                f"{key:<18} {row.balance_planning:>8.3f} {row.balance_next:>8.3f} "
                f"{row.cross_gb:>9.2f} {row.busiest_gb:>10.2f} {row.moved:>6} "
                f"{row.max_gpu_gib:>11.1f} {row.ms:>7.1f}"
            )
        timed = model == "Maverick" and nodes == 4 and redundant == 2 * gpus
        for target, met, detail in targets(rows, nodes, windows.source is not None, timed):
            print(f"   {'MET    ' if met else 'NOT MET'} {target}: {detail}")
            tally.setdefault(target, []).append(met)
            if not met:
                misses.append(f"{name}: {target}: {detail}")
    print("\n== Targets over all cases")
    for target, results in tally.items():
        print(f"   {sum(results)}/{len(results)} met: {target}")
    if misses:
        print("\n== Not met")
        for miss in misses:
            print(f"   {miss}")
    print(f"\nfinished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
