"""Results with out-of-band buffers, and the ResultChunk wire form read and written by hand."""

from __future__ import annotations

import operator
import pickle
import random
from typing import Any

import pytest

from apportion_common import serialize
from apportion_common.serialize import OUT_OF_BAND_MIN_BYTES, Frames
from apportion_common.transfer import _InOrder, chunk_view, chunks
from protos import apportion_pb2 as pb

BIG = OUT_OF_BAND_MIN_BYTES * 3 + 5


class ArrayLike:
    """Pickles its buffer the way numpy does under protocol 5."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return ArrayLike._rebuild, (pickle.PickleBuffer(self.data),)

    @staticmethod
    def _rebuild(buffer: Any) -> ArrayLike:
        return ArrayLike(buffer if isinstance(buffer, bytearray) else bytearray(buffer))


def wire(frames: Frames) -> bytes:
    return b"".join(bytes(s) for s in frames.segments())


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at, i = [], 0, 0
    while at < len(data):
        out.append(data[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return out


def test_a_large_bytes_result_is_kept_out_of_band_and_comes_back_as_that_object() -> None:
    blob = bytes(random.Random(1).randbytes(BIG))
    frames = serialize.dumps_result(blob)
    assert len(frames.buffers) == 1 and len(frames.pickled) < 200
    assert frames.buffers[0].obj is blob  # not copied into the pickle
    assert serialize.loads(frames) is blob  # nor out of it on the same worker
    assert frames.nbytes == len(wire(frames))


@pytest.mark.parametrize(
    "value",
    [
        b"small",
        b"x" * BIG,
        bytearray(b"y" * BIG),
        {"nested": b"z" * BIG, "n": 1},
        [1, 2.5, "three"],
        None,
    ],
    ids=["small-bytes", "bytes", "bytearray", "nested", "list", "none"],
)
def test_results_survive_any_cut_of_their_wire_form(value: Any) -> None:
    data = wire(serialize.dumps_result(value))
    for sizes in ([len(data)], [1, 7, 4096], [OUT_OF_BAND_MIN_BYTES + 1], [3]):
        if sizes == [3] and len(data) > 10_000:
            continue  # byte-sized cuts of a large value prove nothing more
        back = serialize.loads(Frames.parse(cut(data, sizes)))
        assert back == value and type(back) is type(value)
    assert serialize.loads(data) == value  # the joined wire form reads too


def test_a_memoryview_result_comes_back_as_bytes() -> None:
    view = memoryview(bytearray(b"q" * BIG))
    back = serialize.loads(Frames.parse([wire(serialize.dumps_result(view))]))
    assert back == bytes(view) and type(back) is bytes


def test_an_array_like_buffer_stays_out_of_band_and_writable() -> None:
    frames = serialize.dumps_result(ArrayLike(bytearray(b"a" * BIG)))
    assert len(frames.buffers) == 1 and frames.readonly == (False,)
    back = serialize.loads(Frames.parse(cut(wire(frames), [1000])))
    assert isinstance(back, ArrayLike) and isinstance(back.data, bytearray)
    back.data[0] = ord("b")  # writable, as the original was
    assert bytes(back.data[:2]) == b"ba"


def test_small_buffers_stay_in_band() -> None:
    frames = serialize.dumps_result(ArrayLike(bytearray(b"a" * 100)))
    assert frames.buffers == () and wire(frames) == frames.pickled
    assert frames.pickled[:1] == b"\x80"  # a plain pickle: inline results stay plain


def test_a_truncated_or_overlong_framed_value_is_refused() -> None:
    data = wire(serialize.dumps_result(b"x" * BIG))
    with pytest.raises(ValueError, match="cut short"):
        Frames.parse([data[:-1]])
    with pytest.raises(ValueError, match="past its end"):
        Frames.parse([data, b"extra"])
    with pytest.raises(ValueError, match="cut short"):
        Frames.parse([data[:10]])


def test_chunks_are_result_chunk_messages_that_protobuf_reads() -> None:
    frames = serialize.dumps_result(b"x" * BIG)
    encoded = list(chunks(frames, chunk_bytes=50_000))
    messages = [pb.ResultChunk.FromString(c) for c in encoded]
    assert all(m.total_size == frames.nbytes for m in messages)
    assert [len(m.data) for m in messages[:-1]] == [50_000] * (len(messages) - 1)
    assert b"".join(m.data for m in messages) == wire(frames)
    assert list(chunks(b"")) == [b""]
    assert pb.ResultChunk.FromString(b"").total_size == 0


def test_chunk_view_reads_what_protobuf_writes() -> None:
    rng = random.Random(7)
    for size in (0, 1, 127, 128, 300, 70_000):
        data = rng.randbytes(size)
        for total in (0, 1, 300, 2**40):
            raw = pb.ResultChunk(total_size=total, data=data).SerializeToString()
            got_total, offset, view = chunk_view(raw)
            assert (got_total, offset, bytes(view)) == (total, 0, data)
            assert view.obj is raw  # a view, not a copy
    # Unknown fields (a newer sender) are skipped, as protobuf skips them.
    extra = b"\x20\x05" + b"\x2a\x02hi" + b"\x2d\x00\x00\x00\x00" + b"\x31" + b"\x00" * 8
    raw = pb.ResultChunk(total_size=9, data=b"abc").SerializeToString() + extra
    assert chunk_view(raw)[0] == 9 and bytes(chunk_view(raw)[2]) == b"abc"
    raw = pb.ResultChunk(total_size=9, offset=2**33, data=b"abc").SerializeToString()
    assert chunk_view(raw)[:2] == (9, 2**33)


@pytest.mark.parametrize("stripes", [2, 3])
def test_striped_chunks_carry_their_offsets_and_make_the_value_together(stripes: int) -> None:
    # Several buffers, so that chunks straddle where one buffer ends and the next begins.
    value = (b"a" * 130_001, bytearray(b"b" * 70_000), b"c" * 99_999)
    frames = serialize.dumps_result(value)
    whole = wire(frames)
    streams = [
        list(chunks(frames, chunk_bytes=50_000, stripe=i, stripes=stripes)) for i in range(stripes)
    ]
    messages = [[pb.ResultChunk.FromString(c) for c in stream] for stream in streams]
    for i, stream in enumerate(messages):
        assert [m.offset for m in stream] == list(range(i * 50_000, len(whole), stripes * 50_000))
        assert all(m.data == whole[m.offset : m.offset + 50_000] for m in stream)
        assert all(m.total_size == len(whole) for m in stream)
    # Fed in an order the streams could arrive in: one stream first, then the others.
    order = _InOrder()
    for stream in reversed(streams):
        for raw in stream:
            total, offset, data = chunk_view(raw)
            order.take(total, offset, data)
    assert order.assembler is not None and order.assembler.received == len(whole)
    assert serialize.loads(order.assembler.frames()) == value


def test_in_order_refuses_a_chunk_twice_or_past_the_end() -> None:
    order = _InOrder()
    order.take(10, 4, memoryview(b"4567"))
    with pytest.raises(ValueError, match="twice"):
        order.take(10, 4, memoryview(b"4567"))
    with pytest.raises(ValueError, match="past the 10 bytes"):
        order.take(10, 8, memoryview(b"890"))
    with pytest.raises(ValueError, match="disagree"):
        order.take(11, 0, memoryview(b"0123"))


@pytest.mark.parametrize(
    "raw", [b"\x12\x05ab", b"\x08\xff", b"\x0b", b"\x12"], ids=["short", "varint", "group", "len"]
)
def test_chunk_view_refuses_broken_messages(raw: bytes) -> None:
    with pytest.raises(ValueError, match="ResultChunk"):
        chunk_view(raw)


def _by_value(x: int) -> int:
    return x + 1


_by_value.__module__ = "__main__"  # cloudpickle pickles it by value, as a script's own


def test_a_map_function_is_pickled_once_and_unpickled_once_per_worker() -> None:
    function = serialize.dump_function(_by_value)
    payloads = [serialize.dump_call(_by_value, (i,), {}, function) for i in range(3)]
    calls = [serialize.loads(p) for p in payloads]
    assert [fn(*args, **kwargs) for fn, args, kwargs in calls] == [1, 2, 3]
    assert calls[0][0] is calls[1][0]  # one function object from the cache


def test_what_the_c_pickler_cannot_carry_goes_through_cloudpickle() -> None:
    function = serialize.dump_function(_by_value)
    payload = serialize.dump_call(_by_value, (lambda: 5,), {"f": _by_value}, function)
    fn, args, kwargs = serialize.loads(payload)
    assert fn(args[0]()) == 6 and kwargs["f"](1) == 2
    result = serialize.dumps_result({"g": lambda y: y * 2, "h": _by_value})
    back = serialize.loads(result)
    assert back["g"](4) == 8 and back["h"](4) == 5


def test_a_call_of_an_importable_function_takes_the_c_pickler_and_a_lambda_cloudpickle() -> None:
    payload = serialize.dump_call(operator.add, (1, 2), {})
    assert payload == pickle.dumps((operator.add, (1, 2), {}), protocol=5)
    fn, args, kwargs = serialize.loads(payload)
    assert fn(*args, **kwargs) == 3
    offset = 10
    payload = serialize.dump_call(lambda x: x + offset, (1,), {})  # by value: cloudpickle
    fn, args, kwargs = serialize.loads(payload)
    assert fn(*args, **kwargs) == 11
