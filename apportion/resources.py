"""Resource amounts: parsing user input and exact accounting.

Users write amounts as numbers (``2``, ``0.5``, ``100e9``). The scheduler
accounts them in fixed point, as integer multiples of one nano-unit, so that
adding and removing leases returns to exactly zero: 0.1 + 0.2 - 0.3 is 0 in
fixed point and 5.6e-17 in floating point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Fixed-point units per resource unit. Amounts finer than 1e-9 are rounded.
QUANTA_PER_UNIT = 1_000_000_000

Quanta = dict[str, int]

_SEPARATORS = re.compile(r"[\s,]+")


class ResourceSpecError(ValueError):
    """A resource name or amount that cannot be used, naming what was wrong."""


def check_amount(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise naming the bad ``name=value`` pair."""
    if not isinstance(name, str) or not name.strip():
        raise ResourceSpecError(f"resource {name!r}={value!r}: the name is empty")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ResourceSpecError(f"resource {name}={value!r}: the amount is not a number")
    try:
        amount = float(value)
    except ValueError:
        raise ResourceSpecError(f"resource {name}={value!r}: the amount is not a number") from None
    if not math.isfinite(amount) or amount < 0:
        raise ResourceSpecError(
            f"resource {name}={value!r}: the amount must be a finite number >= 0"
        )
    return amount


def check_resources(resources: Mapping[str, object] | None) -> dict[str, float]:
    """Validate a mapping of resource names to amounts; names keep their case."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ResourceSpecError(f"resources must be a mapping of name to amount, not {resources!r}")
    return {name: check_amount(name, value) for name, value in resources.items()}


def parse_resources(text: str) -> dict[str, float]:
    """Parse ``"GPU=2 MEMORY=100e9"`` or ``"A=1,B=2"`` (Dask's forms).

    Raises :class:`ResourceSpecError` naming the first bad pair.
    """
    resources: dict[str, float] = {}
    for pair in _SEPARATORS.split(text.strip()):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        if not sep:
            raise ResourceSpecError(f"resource {pair!r}: expected NAME=VALUE")
        name = name.strip()
        if not name:
            raise ResourceSpecError(f"resource {pair!r}: the name is empty")
        resources[name] = check_amount(name, value.strip())
    return resources


def to_quanta(resources: Mapping[str, float]) -> Quanta:
    """Fixed-point amounts for accounting; zero amounts are dropped."""
    out: Quanta = {}
    for name, amount in resources.items():
        q = round(amount * QUANTA_PER_UNIT)
        if q:
            out[name] = q
    return out


def from_quanta(quanta: Mapping[str, int]) -> dict[str, float]:
    return {name: q / QUANTA_PER_UNIT for name, q in quanta.items()}


def format_resources(resources: Mapping[str, float]) -> str:
    """``{"GPU": 2.0, "MEMORY": 1e11}`` -> ``"GPU=2 MEMORY=1e+11"``."""
    return " ".join(f"{name}={amount:g}" for name, amount in sorted(resources.items()))
