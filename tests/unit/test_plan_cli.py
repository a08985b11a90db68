"""`llama4ctl plan experts`: the file contract."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llama4_operator.cli import main


def problem(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "layers": 2,
        "experts": 4,
        "nodes": 2,
        "gpus_per_node": 1,
        "slots_per_gpu": 3,
        "load": [[10, 6, 3, 1], [1, 2, 3, 4]],
    }
    base.update(overrides)
    return base


def run(tmp_path: Path, document: dict[str, Any], *extra: str) -> tuple[int, str, Path]:
    source = tmp_path / "PROBLEM.json"
    source.write_text(json.dumps(document))
    target = tmp_path / "PLAN.json"
    result = CliRunner().invoke(
        main, ["plan", "experts", "--input", str(source), "--output", str(target), *extra]
    )
    return result.exit_code, result.output, target


@pytest.mark.parametrize("algorithm", ["project", "eplb-global", "eplb-hierarchical", "linear"])
def test_writes_phy2log_with_every_expert_per_layer(tmp_path: Path, algorithm: str) -> None:
    code, output, target = run(tmp_path, problem(), "--algorithm", algorithm)
    assert code == 0, output
    plan = json.loads(target.read_text())
    assert plan["algorithm"] == algorithm
    assert len(plan["phy2log"]) == 2
    for row in plan["phy2log"]:
        assert len(row) == 2 * 1 * 3
        assert set(row) == {0, 1, 2, 3}
    assert 0 < plan["figures"]["balance"] <= 1


def test_eplb_global_matches_the_hand_worked_case(tmp_path: Path) -> None:
    # The case worked out in test_eplb.py: loads [10, 6, 3, 1] on 2 GPUs x 3 slots.
    one_node = problem(nodes=1, gpus_per_node=2, layers=1, load=[[10, 6, 3, 1]])
    code, output, target = run(tmp_path, one_node, "--algorithm", "eplb-global")
    assert code == 0, output
    assert json.loads(target.read_text())["phy2log"] == [[0, 1, 1, 0, 2, 3]]


def test_optional_inputs_are_used(tmp_path: Path) -> None:
    previous = [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]]
    document = problem(
        previous=previous,
        source_load=[[[10, 6, 0, 0], [0, 0, 3, 1]], [[1, 2, 0, 0], [0, 0, 3, 4]]],
        expert_bytes=100,
        max_experts_moved=0,
    )
    code, output, target = run(tmp_path, document)
    assert code == 0, output
    plan = json.loads(target.read_text())
    assert plan["phy2log"] == previous  # no move allowed
    assert plan["figures"]["experts_moved"] == 0
    assert plan["figures"]["max_gpu_expert_bytes"] == 2 * 3 * 100


def test_load_left_out_means_uniform(tmp_path: Path) -> None:
    document = problem(nodes=1, gpus_per_node=4, slots_per_gpu=1)
    del document["load"]
    code, output, target = run(tmp_path, document)
    assert code == 0, output
    assert json.loads(target.read_text())["figures"]["balance"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"load": [[1, 2, 3], [1, 2, 3, 4]]}, "load: expected L lists of E counts"),
        ({"load": [[1, 2, 3, -4], [1, 2, 3, 4]]}, "load[0, 3]: counts must not be negative"),
        ({"slots_per_gpu": 1}, "slots_per_gpu"),
        ({"source_load": [[[1, 1, 1, 1]]]}, "source_load: expected L x G x E counts"),
        ({"previous": [[0, 1, 2, 2, 0, 1], [0, 1, 2, 3, 0, 1]]}, "previous[0]"),
        ({"previous": [[0, 1, 2, 3]]}, "previous: expected L lists of P ids"),
        ({"expert_bytes": [1, 2]}, "expert_bytes"),
        ({"layers": 0}, "layers"),
        ({"gpus": 3}, "gpus"),
    ],
)
def test_bad_input_exits_non_zero_naming_the_field(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    code, output, target = run(tmp_path, problem(**overrides))
    assert code != 0
    assert message in output
    assert not target.exists()


def test_input_that_is_not_json(tmp_path: Path) -> None:
    source = tmp_path / "PROBLEM.json"
    source.write_text("{not json")
    result = CliRunner().invoke(
        main, ["plan", "experts", "--input", str(source), "--output", str(tmp_path / "o.json")]
    )
    assert result.exit_code != 0
    assert "is not JSON" in result.output


def test_balance_slack_out_of_range_is_refused(tmp_path: Path) -> None:
    code, output, _ = run(tmp_path, problem(balance_slack=0.5))
    assert code != 0
    assert "balance_slack" in output


def test_plan_experts_starts_without_the_operator_or_the_optimiser() -> None:
    # Start-up time: `llama4ctl plan experts` must not import kopf (the operator's command) nor
    # scipy.optimize (only a relabelled plan needs it).
    script = (
        "import sys; from llama4_operator.cli import main; "
        "main.get_command(None, 'plan'); "
        "print(sorted({'kopf', 'scipy.optimize'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("dev", "operator", "plan", "simulate"):
        assert command in result.output
