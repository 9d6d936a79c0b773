"""Parsing and checking resource amounts, and their fixed-point accounting."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apportion_common.resources import (
    QUANTA_PER_UNIT,
    ResourceSpecError,
    check_amount,
    check_resources,
    format_resources,
    from_quanta,
    matching_spellings,
    parse_resources,
    parse_spellings,
    short_amount,
    shown_declared,
    shown_like,
    spelling,
    spellings,
    to_quanta,
)

# ------------------------------------------------------------ parse_resources


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1 B=2,C=3", {"A": 1.0, "B": 2.0, "C": 3.0}),
        ("GPU=0.5", {"GPU": 0.5}),
        ("MEMORY=100e9", {"MEMORY": 100e9}),
        ("GPU=2 MEMORY=100e9", {"GPU": 2.0, "MEMORY": 1e11}),
        ("A=1,B=2", {"A": 1.0, "B": 2.0}),
        ("  A=1 ,\tB=2\n", {"A": 1.0, "B": 2.0}),
        ("A=0", {"A": 0.0}),
        ("", {}),
        ("   ", {}),
    ],
)
def test_parse_forms(text: str, expected: dict[str, float]) -> None:
    assert parse_resources(text) == expected


def test_names_keep_their_case() -> None:
    parsed = parse_resources("gpu=1 GPU=2 Gpu=3 myResource=4")
    assert parsed == {"gpu": 1.0, "GPU": 2.0, "Gpu": 3.0, "myResource": 4.0}
    assert list(parsed) == ["gpu", "GPU", "Gpu", "myResource"]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("GPU", "'GPU'"),
        ("A=1 GPU", "'GPU'"),
        ("=2", "'=2'"),
        ("GPU=nan", "GPU='nan'"),
        ("GPU=inf", "GPU='inf'"),
        ("GPU=-inf", "GPU='-inf'"),
        ("GPU=-1", "GPU='-1'"),
        ("GPU=abc", "GPU='abc'"),
        ("GPU=", "GPU=''"),
        ("A=1,GPU=1=2", "GPU='1=2'"),
    ],
)
def test_bad_pairs_raise_naming_the_pair(text: str, names: str) -> None:
    with pytest.raises(ResourceSpecError) as info:
        parse_resources(text)
    message = str(info.value)
    assert names in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_bad_pair_messages_say_what_is_wrong() -> None:
    with pytest.raises(ResourceSpecError, match="expected NAME=VALUE"):
        parse_resources("GPU")
    with pytest.raises(ResourceSpecError, match="the name is empty"):
        parse_resources("=1")
    with pytest.raises(ResourceSpecError, match="finite number >= 0"):
        parse_resources("A=-0.5")
    with pytest.raises(ResourceSpecError, match="not a number"):
        parse_resources("A=two")


def test_first_bad_pair_is_named() -> None:
    with pytest.raises(ResourceSpecError, match="B='x'"):
        parse_resources("A=1 B=x C=-1")


# ------------------------------------------------------------ check_resources


def test_check_resources_accepts_numbers_and_numeric_strings() -> None:
    assert check_resources({"GPU": 1, "MEM": 2.5, "X": "3", "Z": 0}) == {
        "GPU": 1.0,
        "MEM": 2.5,
        "X": 3.0,
        "Z": 0.0,
    }
    assert check_resources(None) == {}
    assert check_resources({}) == {}
    out = check_resources({"gpu": 1, "GPU": 2})
    assert out == {"gpu": 1.0, "GPU": 2.0}
    assert all(type(v) is float for v in out.values())


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        ({"GPU": -1}, "GPU=-1"),
        ({"GPU": math.nan}, "GPU=nan"),
        ({"GPU": math.inf}, "GPU=inf"),
        ({"GPU": "abc"}, "GPU='abc'"),
        ({"GPU": None}, "GPU=None"),
        ({"GPU": True}, "GPU=True"),
        ({"GPU": [1]}, "GPU=[1]"),
        ({"": 1}, "the name is empty"),
        ({"  ": 1}, "the name is empty"),
        ({1: 1}, "the name is empty"),
    ],
)
def test_check_resources_rejects(resources: dict[object, object], fragment: str) -> None:
    with pytest.raises(ResourceSpecError) as info:
        check_resources(resources)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_check_resources_needs_a_mapping() -> None:
    with pytest.raises(ResourceSpecError, match="mapping"):
        check_resources([("GPU", 1)])  # type: ignore[arg-type]
    with pytest.raises(ResourceSpecError, match="mapping"):
        check_resources("GPU=1")  # type: ignore[arg-type]


def test_check_amount_returns_float() -> None:
    assert check_amount("A", "1e3") == 1000.0
    assert check_amount("A", 0) == 0.0


# ------------------------------------------------------------------- units

GIB = 1024**3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64GiB", 68719476736.0),
        ("100GB", 1e11),
        ("1.5 GiB", 1610612736.0),
        ("100e9", 1e11),
        ("2", 2.0),
        ("0.5", 0.5),
        ("0GB", 0.0),
        ("512B", 512.0),
        ("1kB", 1e3),
        ("1KB", 1e3),
        ("1MB", 1e6),
        ("1TB", 1e12),
        ("1PB", 1e15),
        ("1KiB", 1024.0),
        ("1MiB", 1024.0**2),
        ("1TiB", 1024.0**4),
        ("1PiB", 1024.0**5),
        ("64gib", 64.0 * GIB),
        ("64GIB", 64.0 * GIB),
        ("100gb", 1e11),
        (" 1.5  GiB ", 1.5 * GIB),
        (".5GiB", 0.5 * GIB),
        ("1e3GB", 1e12),
    ],
)
def test_amounts_with_units_are_bytes(value: str, expected: float) -> None:
    amount = check_amount("MEMORY", value)
    assert amount == expected
    assert type(amount) is float


def test_units_through_parse_resources() -> None:
    assert parse_resources("MEMORY=64GiB GPU=2") == {"MEMORY": 68719476736.0, "GPU": 2.0}
    assert parse_resources("A=1.5GiB,B=100GB") == {"A": 1610612736.0, "B": 1e11}


def test_units_through_check_resources() -> None:
    # client.submit(resources=...), annotate, LocalCluster and WorkerSettings all use this.
    assert check_resources({"MEMORY": "70GB"}) == {"MEMORY": 7e10}
    assert check_resources({"MEMORY": "32GiB", "GPU": 1}) == {"MEMORY": 32.0 * GIB, "GPU": 1.0}


def test_units_survive_fixed_point_exactly() -> None:
    assert from_quanta(to_quanta(parse_resources("MEMORY=64GiB"))) == {"MEMORY": 64.0 * GIB}
    assert to_quanta({"MEMORY": check_amount("MEMORY", "1PiB")}) == {"MEMORY": 1024**5 * 10**9}


def test_unknown_unit_message() -> None:
    with pytest.raises(ResourceSpecError) as info:
        parse_resources("MEMORY=10XB")
    assert str(info.value) == (
        "resource MEMORY='10XB': unknown unit 'XB' "
        "(use B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-1GB", "finite number >= 0"),
        ("-0.5 GiB", "finite number >= 0"),
        ("1e308PB", "finite number >= 0"),
        ("nan", "finite number >= 0"),
        ("NaN", "finite number >= 0"),
        ("inf", "finite number >= 0"),
        ("-Infinity", "finite number >= 0"),
        (math.nan, "finite number >= 0"),
        (-math.inf, "finite number >= 0"),
        (-3, "finite number >= 0"),
        (10**400, "finite number >= 0"),
        ("", "not a number"),
        ("   ", "not a number"),
        ("GiB", "not a number"),
        ("nanGB", "not a number"),
        ("infGB", "not a number"),
        ("1 2GB", "not a number"),
        ("GB1", "not a number"),
        ("10XB", "unknown unit 'XB'"),
        ("5 apples", "unknown unit 'apples'"),
        ("1 GiBs", "unknown unit 'GiBs'"),
        ("1e", "unknown unit 'e'"),
        ("1Gb/s", "not a number"),
    ],
)
def test_bad_amounts_are_refused_everywhere(value: object, fragment: str) -> None:
    for check in (
        lambda: check_amount("MEMORY", value),
        lambda: check_resources({"MEMORY": value}),
    ):
        with pytest.raises(ResourceSpecError) as info:
            check()
        message = str(info.value)
        assert fragment in message
        assert message.startswith(f"resource MEMORY={value!r}: ")
        assert "\n" not in message
    if isinstance(value, str) and value.strip() and " " not in value:
        with pytest.raises(ResourceSpecError, match=re.escape(fragment)):
            parse_resources(f"GPU=1 MEMORY={value}")


def test_bool_is_still_refused_with_units_around() -> None:
    with pytest.raises(ResourceSpecError, match="not a number"):
        check_amount("MEMORY", True)


# ------------------------------------------------------------------ quanta


def test_to_quanta_is_fixed_point_and_drops_zeros() -> None:
    assert QUANTA_PER_UNIT == 10**9
    assert to_quanta({"GPU": 1}) == {"GPU": 1_000_000_000}
    assert to_quanta({"GPU": 0.5, "A": 0.1, "B": 0.2}) == {
        "GPU": 500_000_000,
        "A": 100_000_000,
        "B": 200_000_000,
    }
    assert to_quanta({"MEMORY": 100e9}) == {"MEMORY": 100 * 10**18}
    assert to_quanta({"Z": 0, "tiny": 1e-10}) == {}
    assert to_quanta({"nano": 1e-9}) == {"nano": 1}
    assert all(type(v) is int for v in to_quanta({"A": 0.3, "B": 7}).values())


def test_fixed_point_sums_are_exact_where_floats_are_not() -> None:
    assert 0.1 + 0.2 - 0.3 != 0
    a, b, c = (to_quanta({"X": v})["X"] for v in (0.1, 0.2, 0.3))
    assert a + b - c == 0
    total = to_quanta({"X": 1})["X"]
    for _ in range(10):
        total -= to_quanta({"X": 0.1})["X"]
    assert total == 0


def test_from_quanta_round_trips() -> None:
    for value in (0.0001, 0.1, 0.3, 0.5, 1.0, 2.5, 7.0, 100e9, 123.456789):
        assert from_quanta(to_quanta({"X": value})) == {"X": value}
    assert from_quanta({}) == {}
    assert from_quanta({"A": 1}) == {"A": 1e-9}


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False))
def test_to_quanta_is_exact_to_nine_places(value: object) -> None:
    amount = float(value)  # type: ignore[arg-type]
    quanta = to_quanta({"X": amount}).get("X", 0)
    assert quanta == round(Fraction(str(value)) * QUANTA_PER_UNIT)
    assert from_quanta({"X": quanta})["X"] == pytest.approx(amount, rel=1e-15, abs=1e-18)


def test_format_resources() -> None:
    assert format_resources({"MEMORY": 1e11, "GPU": 2.0}) == "GPU=2 MEMORY=1e+11"
    assert parse_resources(format_resources({"GPU": 0.5, "MEMORY": 1e11})) == {
        "GPU": 0.5,
        "MEMORY": 1e11,
    }


def test_format_resources_keeps_what_was_written_where_it_still_reads_as_the_amount() -> None:
    amounts = {"MEMORY": 64 * 1024**3, "GPU": 3.0, "DISK": 1e11}
    written = {"MEMORY": "64GiB", "GPU": "2", "DISK": "100GB", "GONE": "1"}
    text = format_resources(amounts, written)
    assert text == "DISK=100GB GPU=3 MEMORY=64GiB"  # GPU was 2 when written: now 3
    assert parse_resources(text) == amounts
    assert parse_spellings(text) == {"DISK": "100GB", "GPU": "3", "MEMORY": "64GiB"}


# -------------------------------------------------- amounts as written, shown


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("GPU=2 MEMORY=100GB", {"GPU": "2", "MEMORY": "100GB"}),
        ("A=0.5,B=100e9 C=64gib", {"A": "0.5", "B": "100e9", "C": "64gib"}),
        ("  M=1.5GiB\t", {"M": "1.5GiB"}),
        ("", {}),
    ],
)
def test_parse_spellings_keeps_each_amount_as_written(text: str, written: dict[str, str]) -> None:
    assert parse_spellings(text) == written


@pytest.mark.parametrize("text", ["GPU", "A=1 A=2", "M=100XB", "GPU=-1"])
def test_parse_spellings_refuses_what_parse_resources_refuses(text: str) -> None:
    with pytest.raises(ResourceSpecError) as refused:
        parse_resources(text)
    with pytest.raises(ResourceSpecError, match=re.escape(str(refused.value))):
        parse_spellings(text)


def test_spellings_keep_text_and_close_a_spaced_unit() -> None:
    assert spelling("1.5 GiB") == "1.5GiB"
    assert spelling(" 100e9 ") == "100e9"
    assert spelling(2) is None  # a number's source text is gone
    given = {"MEMORY": "64 GiB", "GPU": 2, "X": 0.5, "N": "2"}
    assert spellings(given) == {"MEMORY": "64GiB", "N": "2"}
    assert spellings(None) == {}
    # Too long to keep as written: kept as its number, shown in short form.
    long = "0" * 70 + "1GB"
    assert spelling(long) is None
    assert parse_spellings(f"M={long} G=2") == {"G": "2"}
    assert matching_spellings({"M": 1e9}, {"M": long}) == {}


def test_matching_spellings_drops_those_of_amounts_that_changed() -> None:
    written = {"MEMORY": "100GB", "GPU": "2", "X": "0.1", "GONE": "1", "BAD": "lots"}
    amounts = {"MEMORY": 100e9, "GPU": 4.0, "X": 0.1, "BAD": 1.0}
    assert matching_spellings(amounts, written) == {"MEMORY": "100GB", "X": "0.1"}


@pytest.mark.parametrize(
    ("amount", "written", "shown"),
    [
        (70e9, "100GB", "70GB"),
        (100e9, "100GB", "100GB"),
        (1.5e9, "100gb", "1.5GB"),
        (250e6, "100GB", "250MB"),
        (512, "1kB", "512B"),
        (0.5, "1GB", "0.5B"),
        (0, "100GB", "0"),
        (32 * 1024**3, "64GiB", "32GiB"),
        (1.5 * 1024**3, "64 GiB", "1.5GiB"),
        (1e9, "64GiB", "953.7MiB"),
        (2 * 1024**5 * 1024, "1PiB", "2048PiB"),
        (70e9, "100e9", "70G"),
        (70e9, None, "70G"),
        (1, "2", "1"),
        (0.25, "0.5", "0.25"),
    ],
)
def test_shown_like_uses_the_unit_style_of_what_was_written(
    amount: float, written: str | None, shown: str
) -> None:
    assert shown_like(amount, written) == shown


@pytest.mark.parametrize(
    ("amount", "written", "shown"),
    [
        (100e9, "100GB", "100GB"),
        (64 * 1024**3, "64GiB", "64GiB"),
        (1e9, "1000MB", "1000MB"),  # as written, not 1GB
        (100e9, "100e9", "100G"),  # a plain number: short form, as in the issue
        (1e11, "1e+11", "100G"),  # never 1e+11
        (2, "2", "2"),
        (0.5, "0.5", "0.5"),
        (100e9, None, "100G"),
        (200e9, "100GB", "200GB"),  # written for an amount since changed
    ],
)
def test_shown_declared_is_as_written_where_that_has_a_unit(
    amount: float, written: str | None, shown: str
) -> None:
    assert shown_declared(amount, written) == shown


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False),
    st.sampled_from(["100GB", "64GiB", "1kB", "3MiB", "2", "1e9", None]),
)
def test_shown_like_is_short_and_never_an_exponent(amount: float, written: str | None) -> None:
    shown = shown_like(amount, written)
    assert len(shown) <= 12, shown
    if amount >= 1e-4:
        assert "e" not in shown, shown


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (0, "0"),
        (2, "2"),
        (0.5, "0.5"),
        (0.1 + 0.2, "0.3"),
        (1024, "1024"),
        (9999, "9999"),
        (100e9, "100G"),
        (1.5e9, "1.5G"),
        (64 * 1024**3, "64Gi"),
        (1024**2, "1Mi"),
        (123_456_789, "123.5M"),
        (1e18, "1E"),
    ],
)
def test_short_amount_reads_like_the_input(amount: float, shown: str) -> None:
    assert short_amount(amount) == shown


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=1e24, allow_nan=False, allow_infinity=False))
def test_short_amount_is_short_and_never_an_exponent(amount: float) -> None:
    shown = short_amount(amount)
    assert len(shown) <= (8 if amount >= 1 else 11), shown
    if amount >= 1e-4:
        assert "e" not in shown, shown
