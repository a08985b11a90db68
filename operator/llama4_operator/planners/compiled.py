"""Numba compilation for the numeric hot loops (placement search, trace replay), when numba is
installed; the same functions run as plain Python without it, only slower."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

F = TypeVar("F", bound=Callable[..., Any])
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

try:
    from numba import njit as _numba_njit  # type: ignore[import-not-found, unused-ignore]

    def compiled(function: F) -> F:
        """Compile with numba (cached on disk, the GIL released while it runs)."""
        return cast(F, _numba_njit(cache=True, nogil=True)(function))

    COMPILED = True
except ImportError:  # pragma: no cover - exercised only without numba

    def compiled(function: F) -> F:
        return function

    COMPILED = False
