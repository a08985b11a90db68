"""Kubernetes resource quantities ("2", "700m", "6Gi", "1e3"), exactly.

The renderers may not import the Kubernetes client (they do no I/O, and run without it), so this
is the quantity grammar of `k8s.io/apimachinery/pkg/api/resource` in a few lines: a quantity
parses to an exact `Fraction` of the base unit (cores, bytes) and renders in the canonical form
the API server stores ("1400m", "12Gi"), so that multiplying a per-GPU size by a worker's GPUs
loses nothing to floating point. The unit tests check the parser against the client's
`kubernetes.utils.parse_quantity`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_BINARY_SUFFIXES = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}  # powers of 1024
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12}
_DECIMAL_SUFFIXES |= {"P": 15, "E": 18}  # powers of 10
_SUFFIX_OF_EXPONENT = {exponent: suffix for suffix, exponent in _DECIMAL_SUFFIXES.items()}
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:[eE](?P<exponent>[+-]?[0-9]+)|(?P<suffix>[KMGTPE]i|[numkMGTPE]))?"
)


@dataclass(frozen=True)
class Quantity:
    """An exact amount of a resource and the notation it was written in."""

    value: Fraction
    """In the base unit: cores, bytes."""
    binary: bool = False
    """Written with a binary suffix (Ki, Mi, ...): rendered with one too where it divides."""

    def __mul__(self, factor: int) -> Quantity:
        return Quantity(self.value * factor, self.binary)


def parse_quantity(text: str) -> Quantity:
    """`text` as a Kubernetes quantity; ValueError if it is not one."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number = Fraction(match["number"])
    suffix = match["suffix"]
    if suffix in _BINARY_SUFFIXES:
        return Quantity(number * 1024 ** _BINARY_SUFFIXES[suffix], binary=True)
    exponent = int(match["exponent"]) if match["exponent"] else _DECIMAL_SUFFIXES[suffix or ""]
    return Quantity(number * Fraction(10) ** exponent)


def format_quantity(quantity: Quantity) -> str:
    """The canonical form, as the API server writes it back: the largest binary suffix that
    leaves a whole number for a quantity written in binary notation (at least 1Ki); otherwise
    the largest decimal suffix (exponent a multiple of 3) that does, "1400m", "16", "2G".
    A value finer than the nano unit (10^-9) is rounded up to it, as Kubernetes does."""
    value = quantity.value
    if quantity.binary and value.denominator == 1 and abs(value) >= 1024:
        power = 0
        while power < 6 and value % 1024 ** (power + 1) == 0:
            power += 1
        if power:
            suffix = next(s for s, p in _BINARY_SUFFIXES.items() if p == power)
            return f"{value // 1024**power}{suffix}"
    nanos = -((-value * 10**9) // 1)  # ceiling, in units of 10^-9
    if nanos == 0:
        return "0"
    exponent = -9
    while nanos % 1000 == 0:
        nanos //= 1000
        exponent += 3
    if exponent in _SUFFIX_OF_EXPONENT:
        return f"{nanos}{_SUFFIX_OF_EXPONENT[exponent]}"
    return f"{nanos}e{exponent}"
