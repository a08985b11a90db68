"""`llama4ctl simulate`: replay a request trace against an autoscaling policy.

`llama4ctl simulate --trace FILE --policy NAME [options] --json` prints one JSON object with the
policy's SLO attainment, TTFT percentiles, replica-hours against the oracle, scaling actions and
reversals; without `--json` the same figures as a table. The replica model and its numbers are
described in `llama4_operator.simulator.model` and docs/autoscaling.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llama4_operator.simulator.capacity import calibrate_replica_capacity
from llama4_operator.simulator.model import ReplicaModel
from llama4_operator.simulator.policies import POLICY_NAMES
from llama4_operator.simulator.simulation import SimulationSettings
from llama4_operator.simulator.simulation import simulate as run_simulation
from llama4_operator.simulator.traces import TraceError, load_trace, scale_rate


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise click.BadParameter(f"must be {bound}, got {value}", param_hint=f"--{name}")


@click.command()
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens (dates or seconds).",
)
@click.option("--policy", required=True, type=click.Choice(POLICY_NAMES), help="Policy to replay.")
@click.option("--ttft-slo", default=2.0, show_default=True, help="TTFT target, seconds.")
@click.option("--tpot-slo", default=0.1, show_default=True, help="Time per output token, s.")
@click.option("--cold-start", default=300.0, show_default=True, help="Seconds to a ready replica.")
@click.option(
    "--replica-capacity",
    type=float,
    default=None,
    help="Tokens/s one replica sustains within the SLO (C*); measured on the model if left out.",
)
@click.option("--rate-scale", default=1.0, show_default=True, help="Multiply the request rate.")
@click.option("--seed", default=0, show_default=True, help="Seed for cold starts and routing.")
@click.option(
    "--min-replicas",
    default=1,
    show_default=True,
    help="Fewest replicas; 0 lets a policy scale to zero (requests then wait at the router).",
)
@click.option("--max-replicas", default=64, show_default=True)
@click.option("--step-at", type=float, default=None, help="Time of a load step, for step metrics.")
@click.option("--max-num-seqs", default=ReplicaModel.max_num_seqs, show_default=True)
@click.option("--prefill-budget", default=ReplicaModel.prefill_budget_tokens, show_default=True)
@click.option(
    "--knob",
    "knobs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a policy setting, e.g. target=10 (hpa) or target_ongoing_requests=32.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--actions", is_flag=True, help="Include every scaling action in the JSON.")
def simulate(
    trace_path: Path,
    policy: str,
    ttft_slo: float,
    tpot_slo: float,
    cold_start: float,
    replica_capacity: float | None,
    rate_scale: float,
    seed: int,
    min_replicas: int,
    max_replicas: int,
    step_at: float | None,
    max_num_seqs: int,
    prefill_budget: int,
    knobs: tuple[str, ...],
    as_json: bool,
    actions: bool,
) -> None:
    """Replay a request trace against an autoscaling policy."""
    _positive("ttft-slo", ttft_slo)
    _positive("tpot-slo", tpot_slo)
    _positive("cold-start", cold_start, allow_zero=True)
    _positive("replica-capacity", replica_capacity)
    _positive("rate-scale", rate_scale)
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise click.BadParameter(
            "need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1",
            param_hint="--min-replicas",
        )
    try:
        model = ReplicaModel(max_num_seqs=max_num_seqs, prefill_budget_tokens=prefill_budget)
        trace = scale_rate(load_trace(trace_path), rate_scale, seed=seed)
    except (TraceError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    capacity = replica_capacity or calibrate_replica_capacity(
        trace, model, ttft_slo, tpot_slo, seed=seed
    )
    try:
        settings = SimulationSettings(
            replica_capacity_tokens_per_s=capacity,
            ttft_slo_s=ttft_slo,
            tpot_slo_s=tpot_slo,
            cold_start_s=cold_start,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            seed=seed,
            step_at_s=step_at,
            model=model,
        )
        result = run_simulation(trace, policy, settings, _parse_knobs(knobs))
    except (TypeError, ValueError) as error:
        raise click.ClickException(f"{error} (check --knob names for policy {policy!r})") from None
    data = result.as_dict(with_actions=actions)
    if as_json:
        click.echo(json.dumps(data))
        return
    table = Table(title=f"{policy} on {trace.name} ({trace.requests} requests)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in data.items():
        table.add_row(key, _format(value))
    Console().print(table)


def _parse_knobs(knobs: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for knob in knobs:
        name, sep, text = knob.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{knob!r} is not NAME=VALUE", param_hint="--knob")
        try:
            parsed[name] = float(text)
        except ValueError:
            parsed[name] = text
    return parsed


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)
