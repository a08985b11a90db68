"""Expert placement benchmark: linear, EPLB global, EPLB hierarchical and the project's planner,
side by side on the same seeded loads, judged by `llama4_operator.planners.placement_metrics` on
the mean over several drifted next windows.

Run: .venv/bin/python benchmarks/placement/run.py [--family classic|mixed|all] [--slack X]
     .venv/bin/python benchmarks/placement/run.py --pareto
(see README.md in this folder)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import Windows, by_domain, skewed

from llama4_operator.planners import eplb
from llama4_operator.planners import placement_metrics as metrics
from llama4_operator.planners.expert_placement import (
    DEFAULT_BALANCE_SLACK,
    linear_placement,
    plan_experts,
)

# Llama 4 routed expert: gate, up and down projections, hidden 5120 x intermediate 8192, bf16.
EXPERT_BYTES = 3 * 5120 * 8192 * 2
GB = 1e9
GIB = 2**30
NEXT_WINDOWS = 8
REPO = Path(__file__).resolve().parents[2]
LLAMA4CTL = REPO / ".venv" / "bin" / "llama4ctl"

MODELS = {"Scout": (48, 16), "Maverick": (24, 128)}
# The classic family: every shape with 0, G and 2G redundant slots.
CLASSIC_SHAPES = [("Scout", 1), ("Scout", 2), ("Maverick", 1), ("Maverick", 2), ("Maverick", 4)]
ZIPF_EXPONENTS = (0.6, 1.0, 1.4)
DOMAIN_EXPONENT = 1.0
# The mixed family: per-source load on several nodes, every knob drawn from the case's seed.
MIXED_SHAPES = [  # model, nodes, GPUs per node, slots per GPU to draw from
    ("Maverick", 2, 8, (9, 10, 11)),
    ("Maverick", 4, 8, (9, 10, 11)),
    ("Maverick", 3, 4, (11, 12)),
    ("Scout", 2, 8, (2,)),
]
MIXED_SEEDS = (101, 102, 103)
PARETO_SLACKS = (0.0, 0.01, 0.02, 0.03, 0.05)

Planner = Callable[[metrics.Topology, np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    topology: metrics.Topology
    windows: Windows
    timed: bool  # the in-process time target applies

    @property
    def has_sources(self) -> bool:
        return self.windows.planning.source is not None


@dataclass(frozen=True)
class Row:
    balance_planning: float
    balance_next: float  # mean over the next windows
    balance_first_next: float  # the first next window alone
    cross_gb: float  # mean over the next windows
    busiest_gb: float
    moved: int
    max_gpu_gib: float
    ms: float


def _linear(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return linear_placement(topology, load.shape[0], load.shape[1])


def _eplb_global(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return eplb.global_policy(load, topology)


def _eplb_hierarchical(topology: metrics.Topology, load: np.ndarray, *_: object) -> np.ndarray:
    return eplb.hierarchical_policy(load, topology)


def _project(slack: float) -> Planner:
    def planner(
        topology: metrics.Topology,
        load: np.ndarray,
        source: np.ndarray | None,
        previous: np.ndarray | None,
    ) -> np.ndarray:
        return plan_experts(
            topology,
            load.shape[0],
            load.shape[1],
            load,
            source_load=source,
            previous=previous,
            balance_slack=slack,
        ).phy2log

    return planner


def run_planner(planner: Planner, case: Case) -> Row:
    """Plan from the `before` window, re-plan from the `planning` window with that plan as the
    previous placement (timed), and judge the re-plan on the planning and next windows."""
    topology, windows = case.topology, case.windows
    first = planner(topology, windows.before.load, windows.before.source, None)
    start = time.process_time()
    second = planner(topology, windows.planning.load, windows.planning.source, first)
    elapsed = (time.process_time() - start) * 1000
    on_planning = metrics.evaluate(
        second, topology, windows.planning.load, source_load=windows.planning.source
    )
    on_next = [
        metrics.evaluate(second, topology, window.load, source_load=window.source)
        for window in windows.upcoming
    ]
    return Row(
        balance_planning=on_planning.balance,
        balance_next=float(np.mean([figures.balance for figures in on_next])),
        balance_first_next=on_next[0].balance,
        cross_gb=float(np.mean([figures.cross_node_bytes for figures in on_next])) / GB,
        busiest_gb=float(np.mean([figures.busiest_node_cross_bytes for figures in on_next])) / GB,
        moved=metrics.experts_moved(first, second, topology),
        max_gpu_gib=metrics.max_gpu_expert_bytes(second, topology, EXPERT_BYTES) / GIB,
        ms=elapsed,
    )


def targets(case: Case, rows: dict[str, Row]) -> list[tuple[str, bool, str]]:
    """The issue's targets for one case, against the better of the EPLB policies."""
    ours = rows["project"]
    eplb_rows = [row for key, row in rows.items() if key.startswith("eplb")]
    best_next = max(row.balance_next for row in eplb_rows)
    fewest_moved = min(row.moved for row in eplb_rows)
    balance_met = ours.balance_next >= best_next - 0.01
    checks = [
        (
            "mean next-window balance >= EPLB - 0.01",
            balance_met,
            f"{ours.balance_next:.3f} vs {best_next:.3f}",
        ),
        (
            "moves <= 0.25x EPLB with the balance target met",
            ours.moved <= 0.25 * fewest_moved and balance_met,
            f"{ours.moved} vs {fewest_moved} ({ours.moved / max(fewest_moved, 1):.2f}x)",
        ),
    ]
    if case.has_sources and case.topology.nodes > 1:
        least_cross = min(row.cross_gb for row in eplb_rows)
        checks.append(
            (
                "cross-node bytes <= 0.75x EPLB",
                ours.cross_gb <= 0.75 * least_cross,
                f"{ours.cross_gb:.2f} vs {least_cross:.2f} GB "
                f"({ours.cross_gb / max(least_cross, 1e-12):.2f}x)",
            )
        )
    if case.timed:
        checks.append(("<= 100 ms per plan in-process", ours.ms <= 100.0, f"{ours.ms:.1f} ms"))
    return checks


def summary_line(case: Case, rows: dict[str, Row]) -> str:
    """One line: next-window balance (mean, then first window) beside the better EPLB policy's,
    cross-node bytes and moves as ratios to the better EPLB policy's, and the re-plan's time."""
    ours = rows["project"]
    eplb_rows = [row for key, row in rows.items() if key.startswith("eplb")]
    best_next = max(row.balance_next for row in eplb_rows)
    best_first = max(row.balance_first_next for row in eplb_rows)
    least_cross = min(row.cross_gb for row in eplb_rows)
    fewest_moved = min(row.moved for row in eplb_rows)
    cross = f"{ours.cross_gb / least_cross:.2f}x" if least_cross > 0 else "-"
    return (
        f"{case.name:<84} {ours.balance_next:.3f} / {best_next:.3f} "
        f"{ours.balance_first_next:.3f} / {best_first:.3f} {cross:>6} "
        f"{ours.moved / max(fewest_moved, 1):>5.2f}x {ours.ms:>6.1f}"
    )


def classic_cases() -> list[Case]:
    """Every classic shape with 0, G and 2G redundant slots; Zipf loads without sources and one
    load by domain with sources; seeded by the case's position."""
    result = []
    seed = 0
    for model, nodes in CLASSIC_SHAPES:
        layers, experts = MODELS[model]
        gpus = nodes * 8
        for redundant in (0, gpus, 2 * gpus):
            topology = metrics.Topology(nodes, 8, (experts + redundant) // gpus)
            timed = model == "Maverick" and nodes == 4 and redundant == 2 * gpus
            prefix = f"{model} {layers}x{experts} on {nodes}x8, {redundant} redundant"
            for exponent in ZIPF_EXPONENTS:
                seed += 1
                windows = skewed(seed, layers, experts, gpus, exponent, NEXT_WINDOWS)
                result.append(Case(f"{prefix}, zipf {exponent}", model, topology, windows, timed))
            seed += 1
            windows = by_domain(
                seed,
                layers,
                experts,
                nodes=nodes,
                gpus_per_node=8,
                exponent=DOMAIN_EXPONENT,
                next_windows=NEXT_WINDOWS,
            )
            result.append(
                Case(f"{prefix}, domains (zipf {DOMAIN_EXPONENT})", model, topology, windows, timed)
            )
    return result


def mixed_cases() -> list[Case]:
    """Per-source load on several nodes: skew, node locality, drift and slots drawn per seed
    (Zipf 0.7-1.4, 70-90% of a node's tokens from its own mix, drift 0.1-0.3)."""
    result = []
    for model, nodes, per_node, slot_choices in MIXED_SHAPES:
        layers, experts = MODELS[model]
        for seed in MIXED_SEEDS:
            rng = np.random.default_rng([seed, nodes, per_node, experts])
            exponent = round(float(rng.uniform(0.7, 1.4)), 2)
            own_share = round(float(rng.uniform(0.7, 0.9)), 2)
            drift = round(float(rng.uniform(0.1, 0.3)), 2)
            slots = int(rng.choice(slot_choices))
            windows = by_domain(
                seed,
                layers,
                experts,
                nodes=nodes,
                gpus_per_node=per_node,
                exponent=exponent,
                next_windows=NEXT_WINDOWS,
                own_share=own_share,
                drift=drift,
            )
            name = (
                f"{model} {layers}x{experts} on {nodes}x{per_node}, {slots} slots/GPU, "
                f"zipf {exponent}, own {own_share}, drift {drift}, seed {seed}"
            )
            topology = metrics.Topology(nodes, per_node, slots)
            result.append(Case(name, model, topology, windows, False))
    return result


def planners_for(case: Case, slack: float) -> dict[str, Planner]:
    planners: dict[str, Planner] = {"linear": _linear, "eplb-global": _eplb_global}
    if MODELS[case.model][1] % case.topology.nodes == 0:
        planners["eplb-hierarchical"] = _eplb_hierarchical
    planners["project"] = _project(slack)
    return planners


def cli_seconds(case: Case) -> float:
    """Wall time of `llama4ctl plan experts` on the case's planning window (start-up included)."""
    windows, topology = case.windows, case.topology
    layers, experts = windows.planning.load.shape
    previous = _project(DEFAULT_BALANCE_SLACK)(
        topology, windows.before.load, windows.before.source, None
    )
    problem = {
        "layers": layers,
        "experts": experts,
        "nodes": topology.nodes,
        "gpus_per_node": topology.gpus_per_node,
        "slots_per_gpu": topology.slots_per_gpu,
        "load": windows.planning.load.tolist(),
        "source_load": None
        if windows.planning.source is None
        else windows.planning.source.tolist(),
        "previous": previous.tolist(),
    }
    with tempfile.TemporaryDirectory() as folder:
        problem_path, plan_path = Path(folder) / "problem.json", Path(folder) / "plan.json"
        problem_path.write_text(json.dumps(problem))
        start = time.perf_counter()
        subprocess.run(
            [
                str(LLAMA4CTL),
                "plan",
                "experts",
                "--input",
                str(problem_path),
                "--output",
                str(plan_path),
            ],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def run_cases(cases: list[Case], slack: float, *, cli: bool) -> None:
    started = time.perf_counter()
    tally: dict[str, list[bool]] = {}
    misses: list[str] = []
    summary: list[str] = []
    header = (
        f"{'planner':<18} {'bal plan':>8} {'bal next':>8} {'next #1':>8} {'xnode GB':>9} "
        f"{'busiest GB':>10} {'moved':>6} {'max GPU GiB':>11} {'ms':>7}"
    )
    for case in cases:
        print(f"\n== {case.name}")
        print(header)
        rows = {
            key: run_planner(planner, case) for key, planner in planners_for(case, slack).items()
        }
        for key, row in rows.items():
            print(
                f"{key:<18} {row.balance_planning:>8.3f} {row.balance_next:>8.3f} "
                f"{row.balance_first_next:>8.3f} {row.cross_gb:>9.2f} {row.busiest_gb:>10.2f} "
                f"{row.moved:>6} {row.max_gpu_gib:>11.1f} {row.ms:>7.1f}"
            )
        checks = targets(case, rows)
        summary.append(summary_line(case, rows))
        if cli and case.model == "Maverick" and case.topology.gpus == 32 and case.has_sources:
            seconds = cli_seconds(case)
            checks.append(
                ("llama4ctl plan experts <= 2 s wall", seconds <= 2.0, f"{seconds:.2f} s")
            )
        for target, met, detail in checks:
            print(f"   {'MET    ' if met else 'NOT MET'} {target}: {detail}")
            tally.setdefault(target, []).append(met)
            if not met:
                misses.append(f"{case.name}: {target}: {detail}")
    print("\n== Project against the better EPLB policy per case")
    print(f"{'case':<84} {'bal next':>15} {'next #1':>15} {'xnode':>6} {'moved':>6} {'ms':>6}")
    for line in summary:
        print(line)
    print(f"\n== Targets over all cases (balance slack {slack})")
    for target, results in tally.items():
        print(f"   {sum(results)}/{len(results)} met: {target}")
    if misses:
        print("\n== Not met")
        for miss in misses:
            print(f"   {miss}")
    print(f"\nfinished in {time.perf_counter() - started:.1f} s")


def pareto(cases: list[Case]) -> None:
    """Balance against cross-node bytes against moves, for each setting of the planner's balance
    slack and for EPLB's two policies, as means over the cases (ratios to the better EPLB)."""
    eplb_rows = [
        {
            key: run_planner(planner, case)
            for key, planner in planners_for(case, 0.0).items()
            if key.startswith("eplb")
        }
        for case in cases
    ]
    print(
        f"{'planner':<22} {'bal next':>8} {'- EPLB':>7} {'xnode GB':>9} {'x EPLB':>7} "
        f"{'moved':>7} {'x EPLB':>7} {'targets met':>12}"
    )

    def line(label: str, rows: list[Row]) -> None:
        best = [max(r.balance_next for r in e.values()) for e in eplb_rows]
        cross = [min(r.cross_gb for r in e.values()) for e in eplb_rows]
        moved = [min(r.moved for r in e.values()) for e in eplb_rows]
        met = sum(
            row.balance_next >= b - 0.01 and row.cross_gb <= 0.75 * c and row.moved <= 0.25 * m
            for row, b, c, m in zip(rows, best, cross, moved, strict=True)
        )
        print(
            f"{label:<22} {np.mean([r.balance_next for r in rows]):>8.3f} "
            f"{np.mean([r.balance_next - b for r, b in zip(rows, best, strict=True)]):>+7.3f} "
            f"{np.mean([r.cross_gb for r in rows]):>9.2f} "
            f"{np.mean([r.cross_gb / c for r, c in zip(rows, cross, strict=True)]):>7.2f} "
            f"{np.mean([r.moved for r in rows]):>7.0f} "
            f"{np.mean([r.moved / max(m, 1) for r, m in zip(rows, moved, strict=True)]):>7.2f} "
            f"{met:>7}/{len(rows)}"
        )

    line("eplb-global", [e["eplb-global"] for e in eplb_rows])
    hierarchical = [e.get("eplb-hierarchical", e["eplb-global"]) for e in eplb_rows]
    line("eplb-hierarchical*", hierarchical)
    for slack in PARETO_SLACKS:
        line(f"project slack {slack}", [run_planner(_project(slack), case) for case in cases])
    print("* the global policy where the experts do not divide by the nodes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("classic", "mixed", "all"), default="all")
    parser.add_argument("--slack", type=float, default=DEFAULT_BALANCE_SLACK)
    parser.add_argument("--pareto", action="store_true", help="sweep the slack on the mixed family")
    parser.add_argument("--no-cli", action="store_true", help="skip timing llama4ctl")
    args = parser.parse_args()
    if args.pareto:
        pareto(mixed_cases())
        return 0
    cases = []
    if args.family in ("classic", "all"):
        cases += classic_cases()
    if args.family in ("mixed", "all"):
        cases += mixed_cases()
    run_cases(cases, args.slack, cli=not args.no_cli)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
