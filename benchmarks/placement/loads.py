"""Seeded synthetic expert loads for the placement benchmark.

- Zipf-like per-layer popularity: expert of rank r gets weight 1 / r**exponent, ranks shuffled per
  layer.
- Drift: each window multiplies every expert's popularity by exp(drift x N(0, 1)), so the window a
  plan is made from and the next one differ as they do between rebalances. The next windows each
  drift independently from the planning window, so a plan is judged on their mean rather than on
  one draw.
- Token counts: a multinomial draw of TOKENS_PER_GPU tokens per GPU per layer (Llama 4 routes each
  token to one expert).
- Source-dependent load: GPUs are split into domains; each domain's popularity mixes the shared
  Zipf profile with a Zipf profile of its own (`own_share` of it), and each GPU draws its tokens
  from its domain's popularity.
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
class Window:
    """Token counts of one window: by expert, and by sending GPU when known."""

    load: FloatArray  # [layers, experts]
    source: FloatArray | None  # [layers, gpus, experts]


@dataclass(frozen=True)
class Windows:
    """The previous plan's window, the planning window, and drifted next windows."""

    before: Window
    planning: Window
    upcoming: tuple[Window, ...]


def _zipf(rng: np.random.Generator, layers: int, experts: int, exponent: float) -> FloatArray:
    weights = 1.0 / np.arange(1, experts + 1) ** exponent
    profile = np.stack([rng.permutation(weights) for _ in range(layers)])
    normalised: FloatArray = profile / profile.sum(axis=1, keepdims=True)
    return normalised


def _drift(rng: np.random.Generator, popularity: FloatArray, sigma: float) -> FloatArray:
    drifted = popularity * np.exp(sigma * rng.standard_normal(popularity.shape))
    normalised: FloatArray = drifted / drifted.sum(axis=-1, keepdims=True)
    return normalised


def skewed(
    seed: int, layers: int, experts: int, gpus: int, exponent: float, next_windows: int
) -> Windows:
    """Zipf-like loads with no source information."""
    rng = np.random.default_rng(seed)
    before = _drift(rng, _zipf(rng, layers, experts, exponent), DRIFT_SIGMA)
    planning = _drift(rng, before, DRIFT_SIGMA)

    def window(popularity: FloatArray) -> Window:
        counts = np.stack([rng.multinomial(TOKENS_PER_GPU * gpus, p) for p in popularity])
        return Window(counts.astype(np.float64), None)

    return Windows(
        before=window(before),
        planning=window(planning),
        upcoming=tuple(window(_drift(rng, planning, DRIFT_SIGMA)) for _ in range(next_windows)),
    )


def by_domain(
    seed: int,
    layers: int,
    experts: int,
    *,
    nodes: int,
    gpus_per_node: int,
    exponent: float,
    next_windows: int,
    own_share: float = DOMAIN_SHARE,
    drift: float = DRIFT_SIGMA,
) -> Windows:
    """Loads that depend on the GPU the tokens come from: one domain per node (two on a single
    node), `own_share` of each domain's popularity its own."""
    rng = np.random.default_rng(seed)
    gpus = nodes * gpus_per_node
    domains = max(nodes, 2)
    domain_of_gpu = np.arange(gpus) * domains // gpus
    shared = _zipf(rng, layers, experts, exponent)
    popularity = np.stack(
        [
            (1 - own_share) * shared + own_share * _zipf(rng, layers, experts, exponent)
            for _ in range(domains)
        ]
    )  # [domains, layers, experts]

    def window(domain_popularity: FloatArray) -> Window:
        per_gpu = np.stack(
            [
                np.stack([rng.multinomial(TOKENS_PER_GPU, p) for p in domain_popularity[domain]])
                for domain in domain_of_gpu
            ]
        )  # [gpus, layers, experts]
        source = np.transpose(per_gpu, (1, 0, 2)).astype(np.float64)
        return Window(source.sum(axis=1), source)

    before = _drift(rng, popularity, drift)
    planning = _drift(rng, before, drift)
    return Windows(
        before=window(before),
        planning=window(planning),
        upcoming=tuple(window(_drift(rng, planning, drift)) for _ in range(next_windows)),
    )
