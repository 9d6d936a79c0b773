"""Resource amounts: parsing user input and exact accounting.

Users write amounts as numbers (``2``, ``0.5``, ``100e9``) or, as strings, as
byte sizes with a unit, case-insensitive and with an optional space:
``"64GiB"``, ``"100GB"``, ``"1.5 GiB"``. Decimal units (B, kB, MB, GB, TB, PB)
are powers of 1000 and binary ones (KiB, MiB, GiB, TiB, PiB) powers of 1024;
either way the amount becomes a plain number of bytes. Negative, NaN and
infinite amounts are refused.

A worker may declare ``GPU=auto`` and ``GPU_MEMORY=auto`` (any case of
``auto``): the devices it finds at start, counted and their memory summed
(``apportion_common.gpus``). Parsing keeps ``auto`` as their spelling
(:func:`parse_spellings`, :func:`auto_names`); anywhere an amount must be a
number, ``auto`` is refused naming why.

What a user wrote is also kept as text (:func:`spelling`), so that
``apportion status`` can show ``MEMORY=100GB`` as ``100GB`` and the amounts
held of it as ``70GB`` (:func:`shown_declared`, :func:`shown_like`).

The scheduler accounts amounts in fixed point, as integer multiples of one
nano-unit, so that adding and removing leases returns to exactly zero:
0.1 + 0.2 - 0.3 is 0 in fixed point and 5.6e-17 in floating point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Fixed-point units per resource unit. Amounts finer than 1e-9 are rounded.
QUANTA_PER_UNIT = 1_000_000_000
#: The longest amount kept as written ("100GB"; a float in full is 25
#: characters): a longer one is kept as its number, and shows in short form.
MAX_SPELLING_LENGTH = 64

Quanta = dict[str, int]

_SEPARATORS = re.compile(r"[\s,]+")

#: A number, then optionally a unit: ``"64GiB"``, ``"1.5 gib"``, ``"100e9"``.
_AMOUNT = re.compile(
    r"\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*",
    re.IGNORECASE,
)

#: Bytes per unit, keyed by the unit in lower case.
_UNITS = {
    "b": 1,
    **{f"{prefix}b": 1000**power for power, prefix in enumerate("kmgtp", 1)},
    **{f"{prefix}ib": 1024**power for power, prefix in enumerate("kmgtp", 1)},
}
_UNIT_NAMES = "B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB"

#: The spelling of an amount a worker finds on its machine when it starts.
AUTO = "auto"
#: The resources that may be ``auto``: only GPUs can be found and counted.
AUTO_RESOURCES = ("GPU", "GPU_MEMORY")


class ResourceSpecError(ValueError):
    """A resource name or amount that cannot be used, naming what was wrong."""


def is_auto(value: object) -> bool:
    """``value`` is ``"auto"``, in any case and with spaces around."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def auto_names(resources: Mapping[str, object] | None) -> frozenset[str]:
    """The names of :data:`AUTO_RESOURCES` whose amount is ``auto``; any other
    name given ``auto`` is left for :func:`check_amount` to refuse."""
    if not isinstance(resources, Mapping):
        return frozenset()
    return frozenset(n for n, v in resources.items() if n in AUTO_RESOURCES and is_auto(v))


def _refuse_auto(name: str) -> ResourceSpecError:
    if name in AUTO_RESOURCES:
        return ResourceSpecError(
            f"resource {name}=auto: auto is only for the resources a worker declares"
        )
    return ResourceSpecError(f"resource {name}=auto: only GPU and GPU_MEMORY can be auto")


def check_amount(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise naming the bad ``name=value`` pair."""
    if not isinstance(name, str) or not name.strip():
        raise ResourceSpecError(f"resource {name!r}={value!r}: the name is empty")
    if is_auto(value):
        raise _refuse_auto(name)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ResourceSpecError(f"resource {name}={value!r}: the amount is not a number")
    number, factor = value, 1
    match = _AMOUNT.fullmatch(value) if isinstance(value, str) else None
    if match and match["unit"]:
        unit = match["unit"]
        if unit.lower() not in _UNITS:
            raise ResourceSpecError(
                f"resource {name}={value!r}: unknown unit {unit!r} (use {_UNIT_NAMES})"
            )
        number, factor = match["number"], _UNITS[unit.lower()]
    try:
        amount = float(number) * factor
    except ValueError:
        raise ResourceSpecError(f"resource {name}={value!r}: the amount is not a number") from None
    except OverflowError:  # an int too large for a float
        amount = math.inf
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

    Raises :class:`ResourceSpecError` naming the first bad pair (``auto`` too).
    """
    return {name: amount for name, (amount, _) in _parse_pairs(text, False).items()}


def parse_spellings(text: str) -> dict[str, str]:
    """The amounts of ``"GPU=2 MEMORY=100GB"`` as written: ``{"GPU": "2",
    "MEMORY": "100GB"}`` (see :func:`spelling`), checked as
    :func:`parse_resources` checks them, except that ``GPU=auto`` and
    ``GPU_MEMORY=auto`` are kept as ``"auto"`` (a worker's ``--resources``)."""
    pairs = _parse_pairs(text, True).items()
    return {name: written for name, (_, written) in pairs if len(written) <= MAX_SPELLING_LENGTH}


def _parse_pairs(text: str, allow_auto: bool) -> dict[str, tuple[float, str]]:
    pairs: dict[str, tuple[float, str]] = {}
    for pair in _SEPARATORS.split(text.strip()):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        if not sep:
            raise ResourceSpecError(f"resource {pair!r}: expected NAME=VALUE")
        name = name.strip()
        if not name:
            raise ResourceSpecError(f"resource {pair!r}: the name is empty")
        if name in pairs:
            # "GPU=2 GPU=3" is a typo, not an update: which one was meant?
            raise ResourceSpecError(f"resource {name!r} is named twice")
        value = value.strip()
        if allow_auto and name in AUTO_RESOURCES and is_auto(value):
            pairs[name] = (math.nan, AUTO)  # no amount until the worker looks
            continue
        pairs[name] = (check_amount(name, value), _spelled(value))
    return pairs


def spelling(value: object) -> str | None:
    """How a user wrote an amount, to show it back: a string's number and unit
    with no space between (``"1.5 GiB"`` -> ``"1.5GiB"``, which reads back the
    same and stays one word in a ``--resources`` list). None for an amount
    given as a number (its source text is gone) or one over
    :data:`MAX_SPELLING_LENGTH`: those show in short form."""
    if not isinstance(value, str):
        return None
    text = _spelled(value)
    return text if len(text) <= MAX_SPELLING_LENGTH else None


def _spelled(value: str) -> str:
    match = _AMOUNT.fullmatch(value)
    return f"{match['number']}{match['unit']}" if match else value.strip()


def spellings(resources: Mapping[str, object] | None) -> dict[str, str]:
    """:func:`spelling` of each amount given as text (the others have none)."""
    if not isinstance(resources, Mapping):
        return {}
    found = {name: spelling(value) for name, value in resources.items()}
    return {name: text for name, text in found.items() if text is not None}


def matching_spellings(amounts: Mapping[str, float], written: Mapping[str, str]) -> dict[str, str]:
    """Those of ``written`` that read as exactly the amount declared now: a
    spelling of an amount that has changed since is dropped (the new amount
    shows in short form), as is one that does not read at all or is too long."""
    return {
        name: text
        for name, text in written.items()
        if name in amounts and len(text) <= MAX_SPELLING_LENGTH and _reads_as(text, amounts[name])
    }


def _reads_as(text: str, amount: float) -> bool:
    """``text`` parses to ``amount``, as the scheduler accounts it (fixed point)."""
    try:
        read = check_amount("amount", text)
    except ResourceSpecError:
        return False
    return round(read * QUANTA_PER_UNIT) == round(amount * QUANTA_PER_UNIT)


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


def format_resources(
    resources: Mapping[str, float], written: Mapping[str, str] | None = None
) -> str:
    """``{"GPU": 2.0, "MEMORY": 1e11}`` -> ``"GPU=2 MEMORY=1e+11"``.

    Each amount as ``written`` where that still reads as it (``MEMORY=100GB``
    stays so); else short where that reads back exactly, else the full value
    (``{:g}`` keeps 6 digits: 64GiB would come back as 68719500000), so the
    text can be handed to a child process's ``--resources``.
    """
    as_written = matching_spellings(resources, written or {})
    parts = []
    for name, amount in sorted(resources.items()):
        text = as_written.get(name) or f"{amount:g}"
        if name not in as_written and float(text) != amount:
            text = str(int(amount)) if float(amount).is_integer() else repr(float(amount))
        parts.append(f"{name}={text}")
    return " ".join(parts)


#: Suffixes of the short form, powers of 1000 (SI) and, with an ``i``, of 1024.
_SHORT_SUFFIXES = "kMGTPE"
#: Below this an amount is shown in full (``1024``, not ``1.024k``).
_SHORT_FROM = 10_000


def short_amount(amount: float) -> str:
    """An amount as a person reads it: ``2``, ``0.5``, ``100G`` (100e9),
    ``64Gi`` (64GiB), ``1.5M``; never ``1e+11``.

    Exact where a suffix makes it so (SI first, then binary); else four
    significant digits (``68.72G``): this is for showing, not for reading back
    (:func:`format_resources` is).
    """
    if not math.isfinite(amount) or abs(amount) < _SHORT_FROM:
        return f"{amount:.6g}" if abs(amount) >= 1e-4 or amount == 0 else f"{amount:.3g}"
    shown: str | None = None
    for base, tail in ((1000, ""), (1024, "i")):
        power = min(int(math.log(abs(amount), base)), len(_SHORT_SUFFIXES))
        while power > 1 and abs(amount) < base**power:  # log()'s rounding
            power -= 1
        mantissa = amount / base**power
        # Past the largest suffix the mantissa grows: whole, never 1e+04.
        digits = f"{mantissa:.4g}" if mantissa < 1000 else f"{mantissa:.0f}"
        text = f"{digits}{_SHORT_SUFFIXES[power - 1]}{tail}"
        if round(mantissa, 3) == mantissa:
            return text
        shown = shown or text
    assert shown is not None
    return shown


#: Byte units by family, smallest first: each is the base times the one before.
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def shown_like(amount: float, written: str | None) -> str:
    """``amount`` in the unit style of what the user wrote for that resource:
    ``70GB`` beside ``100GB``, ``32GiB`` beside ``64GiB``, :func:`short_amount`
    beside a plain number (``2``, ``100e9``) or nothing; never ``1e+11``."""
    match = _AMOUNT.fullmatch(written) if written else None
    unit = match["unit"].lower() if match else ""
    if unit not in _UNITS or not math.isfinite(amount) or amount == 0:
        return short_amount(amount)
    base, names = (1024, _BINARY_UNITS) if unit.endswith("ib") else (1000, _DECIMAL_UNITS)
    power = 0
    while power + 1 < len(names) and abs(amount) >= base ** (power + 1):
        power += 1
    mantissa = amount / base**power
    if power == 0:  # under a kB (or KiB): plain bytes, short_amount's digits
        return f"{short_amount(amount)}B"
    # Past the largest unit the mantissa grows: whole, never 1e+04.
    digits = f"{mantissa:.4g}" if mantissa < 1000 else f"{mantissa:.0f}"
    return f"{digits}{names[power]}"


def shown_declared(amount: float, written: str | None) -> str:
    """A declared amount as the user wrote it, where that has a unit and still
    reads as the amount (``100GB``, ``64GiB``, ``1000MB``); else as
    :func:`shown_like` shows it (``100e9`` -> ``100G``, ``2`` -> ``2``)."""
    match = _AMOUNT.fullmatch(written) if written else None
    if match and match["unit"] and _reads_as(match.string, amount):
        return match.string
    return shown_like(amount, written)
