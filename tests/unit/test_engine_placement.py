"""Exporters from a placement to engine settings."""

import json

import pytest

from llama4_operator.renderers.engine_placement import (
    sglang_init_expert_location,
    sglang_init_expert_location_json,
    vllm_expert_parallel_args,
)

PHY2LOG = [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]]


def test_sglang_document_is_the_placement_as_physical_to_logical_map() -> None:
    assert sglang_init_expert_location(PHY2LOG) == {"physical_to_logical_map": PHY2LOG}
    assert json.loads(sglang_init_expert_location_json(PHY2LOG)) == {
        "physical_to_logical_map": PHY2LOG
    }


@pytest.mark.parametrize("bad", [[], [[0, 1], [0]], [[0, -1]]])
def test_sglang_refuses_tables_that_are_not_placements(bad: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="phy2log"):
        sglang_init_expert_location(bad)


def test_vllm_redundant_slots_turn_eplb_on() -> None:
    args = vllm_expert_parallel_args(PHY2LOG, experts=4, engine_rebalances=False)
    assert args["enable_expert_parallel"] is True
    assert args["enable_eplb"] is True
    assert args["eplb_config"]["num_redundant_experts"] == 2


def test_vllm_without_redundancy_leaves_balancing_to_the_operator() -> None:
    args = vllm_expert_parallel_args([[0, 1, 2, 3]], experts=4, engine_rebalances=False)
    assert args == {"enable_expert_parallel": True, "enable_eplb": False}


def test_vllm_eplb_window_settings_pass_through() -> None:
    args = vllm_expert_parallel_args(
        [[0, 1, 2, 3]], experts=4, engine_rebalances=True, window_size=10, step_interval=20
    )
    assert args["eplb_config"] == {
        "window_size": 10,
        "step_interval": 20,
        "num_redundant_experts": 0,
        "log_balancedness": False,
    }


def test_vllm_refuses_fewer_slots_than_experts() -> None:
    with pytest.raises(ValueError, match="3 slots for 4 experts"):
        vllm_expert_parallel_args([[0, 1, 2]], experts=4, engine_rebalances=False)
