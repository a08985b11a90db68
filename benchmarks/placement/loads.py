"""Seeded synthetic expert loads for the placement benchmark.

- Zipf-like per-layer popularity: expert of rank r gets weight 1 / r**exponent, ranks shuffled per
  layer.
- Drift: each window multiplies every expert's popularity by exp(DRIFT_SIGMA * N(0, 1)), so the
  window a plan is made from and the next one differ as they do between rebalances.
- Token counts: a multinomial draw of TOKENS_PER_GPU x gpus tokens per layer (Llama 4 routes each
  token to one expert).
- Source-dependent load: GPUs are split into domains (one per node, two on a single node); each
  domain's popularity mixes the shared Zipf profile with a Zipf profile of its own
  (DOMAIN_SHARE of it), and each GPU draws its tokens from its domain's popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

TOKENS_PER_GPU = 4096
DRIFT_SIGMA = 0.3
DOMAIN_SHARE = 0.5


@dataclass(frozen=True)
class Windows:
    """Three consecutive windows: `before` (the previous plan's), `planning`, `next`."""

    load: tuple[FloatArray, FloatArray, FloatArray]  # each [layers, experts]
    source: tuple[FloatArray, FloatArray, FloatArray] | None  # each [layers, gpus, experts]


def _zipf(rng: np.random.Generator, layers: int, experts: int, exponent: float) -> FloatArray:
    weights = 1.0 / np.arange(1, experts + 1) ** exponent
    profile = np.stack([rng.permutation(weights) for _ in range(layers)])
    normalised: FloatArray = profile / profile.sum(axis=1, keepdims=True)
    return normalised


def _drift(rng: np.random.Generator, popularity: FloatArray) -> FloatArray:
    drifted = popularity * np.exp(DRIFT_SIGMA * rng.standard_normal(popularity.shape))
    normalised: FloatArray = drifted / drifted.sum(axis=-1, keepdims=True)
    return normalised


def skewed(seed: int, layers: int, experts: int, gpus: int, exponent: float) -> Windows:
    """Zipf-like loads with no source information."""
    rng = np.random.default_rng(seed)
    popularity = _zipf(rng, layers, experts, exponent)
    windows = []
    for _ in range(3):
        popularity = _drift(rng, popularity)
        windows.append(
            np.stack([rng.multinomial(TOKENS_PER_GPU * gpus, p) for p in popularity]).astype(
                np.float64
            )
        )
    return Windows(load=(windows[0], windows[1], windows[2]), source=None)


def by_domain(
    seed: int, layers: int, experts: int, *, nodes: int, gpus_per_node: int, exponent: float
) -> Windows:
    """Loads that depend on the GPU the tokens come from."""
    rng = np.random.default_rng(seed)
    gpus = nodes * gpus_per_node
    domains = max(nodes, 2)
    domain_of_gpu = np.arange(gpus) * domains // gpus
    shared = _zipf(rng, layers, experts, exponent)
    popularity = np.stack(
        [
            (1 - DOMAIN_SHARE) * shared + DOMAIN_SHARE * _zipf(rng, layers, experts, exponent)
            for _ in range(domains)
        ]
    )  # [domains, layers, experts]
    sources = []
    for _ in range(3):
        popularity = _drift(rng, popularity)
        per_gpu = np.stack(
            [
                np.stack([rng.multinomial(TOKENS_PER_GPU, p) for p in popularity[domain]])
                for domain in domain_of_gpu
            ]
        )  # [gpus, layers, experts]
        sources.append(np.transpose(per_gpu, (1, 0, 2)).astype(np.float64))
    return Windows(
        load=(sources[0].sum(axis=1), sources[1].sum(axis=1), sources[2].sum(axis=1)),
        source=(sources[0], sources[1], sources[2]),
    )
