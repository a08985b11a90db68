"""Exporters from an expert placement (phy2log per MoE layer) to what engines accept.

- SGLang: `--init-expert-location` takes a JSON document (inline or a file) whose
  `physical_to_logical_map` is [layers][physical experts], the project's phy2log as is.
- vLLM: no option takes a full placement; the expert-parallel engine arguments carry its shape
  (expert parallelism on, the number of redundant experts) and vLLM's own EPLB keeps balancing
  (`enable_eplb` with `eplb_config`: `window_size`, `step_interval`, `num_redundant_experts`,
  `log_balancedness`, as named in vLLM's `EPLBConfig`). vLLM refuses redundant experts without
  its EPLB, so redundant slots turn it on; otherwise it is on only when asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def _check_rows(phy2log: Sequence[Sequence[int]]) -> list[list[int]]:
    rows = [[int(expert) for expert in row] for row in phy2log]
    if not rows or len({len(row) for row in rows}) != 1 or not rows[0]:
        raise ValueError("phy2log must be a non-empty [layers][slots] table of equal rows")
    if any(expert < 0 for row in rows for expert in row):
        raise ValueError("phy2log holds a negative expert id")
    return rows


def sglang_init_expert_location(phy2log: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The document SGLang's `--init-expert-location` reads."""
    return {"physical_to_logical_map": _check_rows(phy2log)}


def sglang_init_expert_location_json(phy2log: Sequence[Sequence[int]]) -> str:
    """The same document as compact JSON, for a ConfigMap key or the inline flag value."""
    return json.dumps(sglang_init_expert_location(phy2log), separators=(",", ":"))


def vllm_expert_parallel_args(
    phy2log: Sequence[Sequence[int]],
    *,
    experts: int,
    engine_rebalances: bool,
    window_size: int = 1000,
    step_interval: int = 3000,
    log_balancedness: bool = False,
) -> dict[str, Any]:
    """vLLM engine arguments for expert parallelism matching the placement's shape.

    `engine_rebalances`: ask for vLLM's EPLB even without redundant slots.
    """
    rows = _check_rows(phy2log)
    slots = len(rows[0])
    if slots < experts:
        raise ValueError(f"the placement has {slots} slots for {experts} experts")
    redundant = slots - experts
    eplb_on = engine_rebalances or redundant > 0
    args: dict[str, Any] = {"enable_expert_parallel": True, "enable_eplb": eplb_on}
    if eplb_on:
        args["eplb_config"] = {
            "window_size": window_size,
            "step_interval": step_interval,
            "num_redundant_experts": redundant,
            "log_balancedness": log_balancedness,
        }
    return args
