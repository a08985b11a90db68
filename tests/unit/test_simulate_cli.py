"""`llama4ctl simulate`: one JSON object or a table, and clear errors for bad options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llama4_operator.cli import main

REQUIRED = {
    "policy",
    "slo_attainment",
    "ttft_p99_s",
    "replica_hours",
    "oracle_replica_hours",
    "scaling_actions",
    "reversals",
}


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten minutes at 20 requests/s, then ten at 60: enough for a policy to act."""
    rng = np.random.default_rng(0)
    gaps = np.concatenate([rng.exponential(1 / 20, 12_000), rng.exponential(1 / 60, 36_000)])
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < 1200.0]
    path = tmp_path_factory.mktemp("traces") / "burst.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{t:.4f},{rng.integers(200, 2000)},{rng.integers(10, 300)}" for t in arrivals]
    path.write_text("\n".join(lines) + "\n")
    return path


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["simulate", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("policy", ["token", "hpa", "keda-tokens", "kpa", "rayserve", "oracle"])
def test_json_output_has_the_figures_for_every_policy(trace_file: Path, policy: str) -> None:
    code, output = _invoke(
        "--trace", str(trace_file), "--policy", policy, "--replica-capacity", "15000",
        "--cold-start", "60", "--json",
    )  # fmt: skip
    assert code == 0, output
    data = json.loads(output)
    assert set(data) >= REQUIRED
    assert data["policy"] == policy
    assert 0.0 <= data["slo_attainment"] <= 1.0
    assert data["replica_hours"] > 0
    assert data["oracle_replica_hours"] > 0
    assert data["reversals"] <= data["scaling_actions"]


def test_token_policy_scales_up_on_the_load_increase(trace_file: Path) -> None:
    code, output = _invoke(
        "--trace", str(trace_file), "--policy", "token", "--replica-capacity", "15000",
        "--cold-start", "60", "--json", "--actions",
    )  # fmt: skip
    assert code == 0, output
    actions = json.loads(output)["actions"]
    assert any(t >= 600 and after > before for t, before, after in actions)


def test_table_output_without_json(trace_file: Path) -> None:
    code, output = _invoke(
        "--trace", str(trace_file), "--policy", "oracle", "--replica-capacity", "15000"
    )
    assert code == 0, output
    assert "slo_attainment" in output
    assert "oracle_replica_hours" in output


def test_rate_scale_and_seed_change_the_replay(trace_file: Path) -> None:
    base = ["--trace", str(trace_file), "--policy", "oracle", "--replica-capacity", "15000"]
    _, single = _invoke(*base, "--json")
    _, double = _invoke(*base, "--rate-scale", "2", "--json")
    assert json.loads(double)["oracle_replica_hours"] > json.loads(single)["oracle_replica_hours"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-scale", "0"], "--rate-scale"),
        (["--ttft-slo", "-1"], "--ttft-slo"),
        (["--cold-start", "-5"], "--cold-start"),
        (["--replica-capacity", "0"], "--replica-capacity"),
        (["--min-replicas", "5", "--max-replicas", "2"], "--min-replicas"),
        (["--min-replicas", "-1"], "--min-replicas"),
        (["--min-replicas", "0", "--max-replicas", "0"], "--min-replicas"),
        (["--knob", "no_such_setting=1"], "no_such_setting"),
        (["--knob", "oops"], "NAME=VALUE"),
    ],
)
def test_bad_options_are_named(trace_file: Path, args: list[str], message: str) -> None:
    code, output = _invoke(
        "--trace", str(trace_file), "--policy", "hpa", "--replica-capacity", "15000", *args
    )
    assert code != 0
    assert message in output


def test_unknown_policy_lists_the_choices(trace_file: Path) -> None:
    code, output = _invoke("--trace", str(trace_file), "--policy", "magic")
    assert code == 2
    assert "keda-tokens" in output


def test_bad_trace_file_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("when,prompt,output\n1,2,3\n")
    code, output = _invoke("--trace", str(bad), "--policy", "token")
    assert code == 1
    assert "TIMESTAMP" in output
    code, output = _invoke("--trace", str(tmp_path / "none.csv"), "--policy", "token")
    assert code == 1
    assert "does not exist" in output
