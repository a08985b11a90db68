"""Sampling parameters and the next-token sampler (temperature, nucleus, per-request seed)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation; `max_tokens=None` runs to the model's length limit."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must lie in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    def generator(self) -> torch.Generator:
        """A generator of its own, so a seeded request samples the same tokens in any batch."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else softmax at the temperature, cut to the top-p nucleus."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token when the mass before it is still short of top_p (the first always stays).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        nucleus = torch.zeros_like(probs)
        nucleus[order[keep]] = sorted_probs[keep]
        probs = nucleus / nucleus.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())
