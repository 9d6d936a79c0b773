"""Large buffers leave the pickle wherever they sit in a result (issue 12).

The shapes users' results have: bare bytes, a tuple of bytes and metadata,
nested lists and dicts, objects holding bytes, NumPy arrays, pandas frames.
Each must keep its large buffers out of band (``Frames.buffers``) so that
they are never copied into the pickle and out again, and come back equal,
with the same types, through every way a value travels.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
import pandas as pd
import pytest

from apportion_common import serialize
from apportion_common.frames import OUT_OF_BAND_MIN_BYTES, Assembler, Frames
from apportion_common.serialize import RESCAN_IN_BAND_BYTES, SCAN_ITEMS

BIG = OUT_OF_BAND_MIN_BYTES * 2 + 3


def blob(seed: int, n: int = BIG) -> bytes:
    return bytes([seed % 251]) * n


@dataclasses.dataclass
class Image:
    pixels: bytes
    name: str


class Slotted:
    """No __dict__: the scan cannot look inside, the rescan must."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return Slotted, (self.data,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slotted) and other.data == self.data


def wire(frames: Frames) -> bytes:
    return b"".join(bytes(s) for s in frames.segments())


SHAPES: dict[str, Any] = {
    "bytes": blob(1),
    "tuple": (blob(2), {"shape": (3, 4), "name": "x"}),
    "list": [blob(3), blob(4), 5],
    "dict": {"a": blob(5), "b": bytearray(blob(6)), "n": None},
    "nested": [{"x": (1, [blob(7)])}],
    "object": Image(blob(8), "cat"),
    "slots": Slotted(b"s" * (RESCAN_IN_BAND_BYTES + 1)),
    "ndarray": np.arange(BIG // 8, dtype=np.float64),
    "dict-of-arrays": {"a": np.ones(BIG // 8), "b": np.arange(BIG // 4, dtype=np.int32)},
    "dataframe": pd.DataFrame({"a": np.arange(BIG // 8), "b": np.ones(BIG // 8)}),
    "series": pd.Series(np.arange(BIG // 8, dtype=np.float64), name="s"),
}


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame | pd.Series):
        return type(a) is type(b) and a.equals(b)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and bool((a == b).all())
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return type(a) is type(b) and bool(a == b)


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_large_buffer_leaves_the_pickle_and_comes_back(name: str) -> None:
    value = SHAPES[name]
    frames = serialize.dumps_result(value)
    assert frames.buffers, "no buffer was kept out of band"
    assert len(frames.pickled) < OUT_OF_BAND_MIN_BYTES, "a large buffer was copied in band"
    assert equal(serialize.loads(frames), value)  # on the worker that made it
    data = wire(frames)
    assert frames.nbytes == len(data)
    assert equal(serialize.loads(Frames.parse([data])), value)  # from one message
    pieces = [data[i : i + 100_003] for i in range(0, len(data), 100_003)]
    assert equal(serialize.loads(Frames.parse(pieces)), value)  # from chunks


def test_bytes_inside_a_tuple_are_not_copied_on_the_worker_that_made_them() -> None:
    data = blob(9)
    frames = serialize.dumps_result((data, {"meta": 1}))
    assert frames.buffers[0].obj is data
    back = serialize.loads(frames)
    assert back[0] is data


def test_bytes_received_whole_are_not_copied_again() -> None:
    frames = Frames.parse([wire(serialize.dumps_result((blob(1), 2)))])
    assert type(frames.buffers[0].obj) is bytes
    assert serialize.loads(frames)[0] is frames.buffers[0].obj


def test_the_same_bytes_twice_travel_once() -> None:
    data = blob(2)
    frames = serialize.dumps_result([data, data, (data,)])
    assert len(frames.buffers) == 1
    back = serialize.loads(Frames.parse([wire(frames)]))
    assert back[0] is back[1] is back[2][0]


def test_a_writable_array_comes_back_writable_and_a_bytearray_a_bytearray() -> None:
    frames = serialize.dumps_result({"a": np.zeros(BIG // 8), "b": bytearray(blob(3))})
    back = serialize.loads(Frames.parse([wire(frames)]))
    back["a"][0] = 1.0
    assert type(back["b"]) is bytearray
    back["b"][0] = 0


def test_a_memoryview_inside_a_result_comes_back_as_bytes() -> None:
    view = memoryview(bytearray(blob(4)))[10:]
    back = serialize.loads(Frames.parse([wire(serialize.dumps_result((view, 1)))]))
    assert back == (bytes(view), 1)


def test_small_results_stay_one_plain_pickle() -> None:
    for value in (1, "s", (1, 2, "x"), [b"x" * 100] * 3, {"a": 1.5}, list(range(1000))):
        frames = serialize.dumps_result(value)
        assert frames.buffers == () and frames.pickled[:1] == b"\x80"
        assert pickle.loads(frames.pickled) == value  # reads without apportion


def test_a_long_list_of_small_items_is_pickled_once() -> None:
    # More items than the scan looks at, small each: not worth a second pickling.
    value = list(range(SCAN_ITEMS * 1000))
    frames = serialize.dumps_result(value)
    assert frames.buffers == () and pickle.loads(frames.pickled) == value


def test_many_large_bytes_in_a_long_list_still_leave_the_pickle() -> None:
    value = [blob(i) for i in range(SCAN_ITEMS + 5)]
    frames = serialize.dumps_result(value)
    assert len(frames.buffers) == len(value)
    assert serialize.loads(Frames.parse([wire(frames)])) == value


def test_a_result_of_a_class_defined_in_main_still_pickles_by_value() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("class Box:\n    def __init__(self, b):\n        self.b = b\n", namespace)
    box = namespace["Box"](blob(5))
    frames = serialize.dumps_result((box, 1))
    assert b"__main__" in frames.pickled or len(frames.buffers) == 1
    back = serialize.loads(Frames.parse([wire(frames)]))
    assert back[0].b == box.b


def assemble(data: bytes, size: int) -> Frames:
    assembler = Assembler(len(data))
    for i in range(0, len(data), size):
        assembler.feed(memoryview(data)[i : i + size])
    return assembler.frames()


@pytest.mark.parametrize("name", ["bytes", "tuple", "dict", "dict-of-arrays", "dataframe"])
def test_chunks_are_assembled_into_place_whatever_their_size(name: str) -> None:
    value = SHAPES[name]
    data = wire(serialize.dumps_result(value))
    for size in (1 << 20, 4096, 7, len(data)):
        frames = assemble(data, size)
        back = serialize.loads(frames)
        assert equal(back, value)
    if name == "bytes":
        assert (
            type(frames.buffers[0].obj) is bytes
            and serialize.loads(frames) is frames.buffers[0].obj
        )
    if name == "dict-of-arrays":
        back["a"][0] = 5.0  # writable, as the original was


@pytest.mark.parametrize("value", [None, 1, "s" * 100_000, list(range(10_000))])
def test_plain_pickles_are_assembled_too(value: Any) -> None:
    data = wire(serialize.dumps_result(value))
    for size in (1, 3, 5, 1000, len(data)):
        assert serialize.loads(assemble(data, size)) == value


def test_the_assembler_refuses_what_does_not_add_up() -> None:
    data = wire(serialize.dumps_result((blob(1), 2)))
    short = Assembler(len(data))
    short.feed(memoryview(data)[:-1])
    with pytest.raises(ValueError, match="cut short"):
        short.frames()
    with pytest.raises(ValueError, match="more than"):
        Assembler(10).feed(memoryview(data))
    with pytest.raises(ValueError, match="header says otherwise"):
        Assembler(len(data) + 1).feed(memoryview(data))
