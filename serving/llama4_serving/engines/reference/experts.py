"""The routed expert's feed-forward, shared by in-process experts and expert shard actors.

Kept apart from the model so that shard actors import torch only, not `transformers`.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def expert_ffn(tokens: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert (SwiGLU) on `tokens` [n, hidden], laid out as `Llama4TextExperts`."""
    gate, up = (tokens @ gate_up).chunk(2, dim=-1)
    result: torch.Tensor = (up * functional.silu(gate)) @ down
    return result
