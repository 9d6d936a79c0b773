"""Fresh buffers for arriving values: the right type, size and contents, large or small."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from apportion_common import fresh
from apportion_common.frames import Assembler, Frames
from apportion_common.serialize import dumps_result, loads

LARGE = fresh.HUGE_MIN_BYTES + 4097


@pytest.mark.parametrize("n", [0, 1, 4096, LARGE])
def test_new_bytes_is_filled_in_place(n: int) -> None:
    obj, view = fresh.new_bytes(n)
    view[:] = b"q" * n
    made = obj if type(obj) is bytes else bytes(obj)
    assert made == b"q" * n and len(view) == n


@pytest.mark.parametrize("n", [1, 4096, LARGE])
def test_new_writable_is_zeroed_writable_and_takes_arrays(n: int) -> None:
    obj, view = fresh.new_writable(n)
    assert bytes(view) == bytes(n) and not view.readonly
    view[-1:] = b"\x07"
    assert np.frombuffer(obj, dtype=np.uint8)[-1] == 7


@pytest.mark.parametrize(
    "value",
    [
        b"x" * LARGE,
        (b"t" * LARGE, {"meta": 1}),
        {"a": np.arange(LARGE // 8), "b": bytearray(b"y" * LARGE)},
        [np.ones(3), [b"z" * LARGE, b"z" * LARGE]],
    ],
    ids=["bytes", "tuple", "dict", "list"],
)
def test_large_values_assembled_in_chunks_come_back_equal_and_of_their_types(
    value: object,
) -> None:
    frames = dumps_result(value)
    wire = b"".join(bytes(s) for s in frames.segments())
    assembler = Assembler(len(wire))
    for at in range(0, len(wire), 1 << 20):
        assembler.feed(memoryview(wire)[at : at + (1 << 20)])
    back = loads(assembler.frames())
    assert pickle.dumps(back) == pickle.dumps(value)
    if isinstance(value, dict):
        assert type(back["b"]) is bytearray and back["a"].flags.writeable
        back["a"][0] = 42  # its own memory


def test_frames_parsed_whole_still_work() -> None:
    frames = dumps_result((np.arange(LARGE // 8), b"w" * LARGE))
    parsed = Frames.parse(frames.segments())
    back = loads(parsed)
    assert (back[0] == np.arange(LARGE // 8)).all() and back[1] == b"w" * LARGE
