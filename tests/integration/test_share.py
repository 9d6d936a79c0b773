"""Results handed over in shared memory by a real Worker service (in-process, port 0)."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apportion_common import serialize, shm
from apportion_common.locations import InputLocation
from apportion_common.transfer import ChannelPool, NotShared, ResultUnavailable
from protos import apportion_pb2 as pb
from worker_service.assignment import Assignment
from worker_service.inputs import SHARE_MIN_BYTES, InputFetcher
from worker_service.store import ResultStore

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

BIG = SHARE_MIN_BYTES + 17


def our_segments() -> list[str]:
    """Names this process made (the in-process servicer is this process)."""
    return [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getpid()}-*")]


@pytest.fixture
def served(worker_server: tuple[ResultStore, str]) -> Iterator[tuple[ResultStore, str]]:
    yield worker_server
    assert our_segments() == []


async def test_values_with_arrays_come_through_a_segment_that_is_gone_after(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    values = {
        "array": np.arange(BIG // 8),
        "arrays": {"a": np.arange(BIG // 8), "b": np.ones(BIG // 8)},
        "mixed": (np.ones(BIG // 8), b"m" * BIG, {"meta": 1}),
    }
    for key, value in values.items():
        store.put(key, 1, serialize.dumps_result(value))
    pool = ChannelPool()
    try:
        back = serialize.loads(await pool.share(address, "array"))
        assert (back == values["array"]).all()
        arrays = serialize.loads(await pool.share(address, "arrays"))
        assert all((arrays[k] == values["arrays"][k]).all() for k in ("a", "b"))  # type: ignore[index]
        arrays["a"][0] = 99  # a private mapping: writable, and ours alone
        assert serialize.loads(store.get("arrays"))["a"][0] == 0  # type: ignore[arg-type]
        mixed = serialize.loads(await pool.share(address, "mixed"))
        assert mixed[1] == values["mixed"][1] and type(mixed[1]) is bytes  # type: ignore[index]
        assert our_segments() == []  # named only for the hand-off
    finally:
        await pool.close()


async def test_a_published_result_is_mapped_from_its_own_segment_until_released(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    value = {"a": np.arange(BIG // 8), "meta": b"m" * BIG}
    made = serialize.dumps_result(value)
    published = shm.publish(made, SHARE_MIN_BYTES)
    assert published is not None
    own, segment = published
    assert our_segments() == [segment.name]
    # The holder's own copy is the segment: arrays over it, bytes copied out.
    own_value = serialize.loads(own)
    assert (own_value["a"] == value["a"]).all() and own_value["meta"] == value["meta"]
    assert type(own_value["meta"]) is bytes
    assert all(isinstance(b.obj, mmap.mmap) for b in own.buffers)
    store.put("k", 1, own, segment=segment)
    pool = ChannelPool()
    try:
        for _ in range(2):  # every peer maps the same segment; none removes it
            back = serialize.loads(await pool.share(address, "k"))
            assert (back["a"] == value["a"]).all() and back["meta"] == value["meta"]
            back["a"][0] = -5  # private: neither the holder nor the next peer sees it
            assert our_segments() == [segment.name]
        assert serialize.loads(store.get("k"))["a"][0] == 0  # type: ignore[arg-type]
    finally:
        await pool.close()
    store.release("k")
    assert our_segments() == []


def test_a_result_is_published_only_with_enough_bytes_in_buffers() -> None:
    small = [b"b" * (SHARE_MIN_BYTES - 1000), np.arange(10), {"x": 1}]
    for value in small:
        assert shm.publish(serialize.dumps_result(value), SHARE_MIN_BYTES) is None
    assert our_segments() == []
    published = shm.publish(serialize.dumps_result((b"b" * BIG, 1)), SHARE_MIN_BYTES)
    assert published is not None
    own, segment = published
    try:
        assert serialize.loads(own) == (b"b" * BIG, 1) and own.buffers[0].readonly
    finally:
        segment.remove()


def test_a_stores_segments_go_when_results_are_replaced_dropped_or_cleared() -> None:
    store = ResultStore()

    def put(key: str, incarnation: int = 1) -> str:
        published = shm.publish(serialize.dumps_result(np.ones(BIG // 8)), SHARE_MIN_BYTES)
        assert published is not None
        store.put(key, 1, published[0], incarnation, published[1])
        return published[1].name

    first = put("k")
    second = put("k")
    assert our_segments() == [second] and first != second
    put("fetched", incarnation=0)
    assert len(our_segments()) == 2
    store.keep_only_own()  # after losing the scheduler: fetched copies go
    assert our_segments() == [second]
    store.clear()
    assert our_segments() == []


async def test_bytes_only_values_are_streamed_not_shared(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    for key, value in {"bytes": b"b" * BIG, "tuple": (b"t" * BIG, {"meta": 1})}.items():
        store.put(key, 1, serialize.dumps_result(value))
    pool = ChannelPool()
    try:
        for key in ("bytes", "tuple"):
            with pytest.raises(NotShared):
                await pool.share(address, key)
            assert our_segments() == []
    finally:
        await pool.close()


async def test_a_missing_key_is_not_found(served: tuple[ResultStore, str]) -> None:
    _, address = served
    pool = ChannelPool()
    try:
        with pytest.raises(ResultUnavailable, match="NOT_FOUND"):
            await pool.share(address, "nope")
    finally:
        await pool.close()


async def test_a_peer_that_asks_and_goes_away_leaves_no_segment(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    store.put("k", 1, serialize.dumps_result(np.ones(BIG // 8)))
    pool = ChannelPool()
    try:
        call = pool.stub(address).ShareResult()
        await call.write(pb.ShareRequest(key="k"))
        reply = await call.read()
        assert isinstance(reply, pb.ShareReply) and reply.segment in our_segments()
        call.cancel()  # as a consumer killed before mapping it
        for _ in range(100):
            if not our_segments():
                break
            await asyncio.sleep(0.02)
        assert our_segments() == []
    finally:
        await pool.close()


async def test_a_full_dev_shm_falls_back_to_the_stream(
    served: tuple[ResultStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, address = served
    value = (np.arange(BIG // 8), 1)
    store.put("k", 1, serialize.dumps_result(value))

    def full(fd: int, segments: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm, "_write_all", full)
    pool = ChannelPool()
    try:
        with pytest.raises(ResultUnavailable, match="No space left"):
            await pool.share(address, "k")
        fetcher = InputFetcher(ResultStore(), pool, "127.0.0.1:1")
        a = Assignment(
            key="consumer",
            run_id=1,
            payload=b"",
            resources={},
            need={},
            inputs=(InputLocation("k", (address,), BIG, (True,)),),
        )
        inputs = await fetcher.gather(a)
        back = serialize.loads(inputs.values["k"])
        assert not inputs.missing and (back[0] == value[0]).all() and back[1] == 1
    finally:
        await pool.close()


def test_only_apportion_segment_names_are_opened() -> None:
    for name in ("../../etc/passwd", "apportion-1-2", "other", "apportion-1-2-zzzzzzzz"):
        with pytest.raises(shm.SharedMemoryUnavailable, match="not an apportion segment"):
            shm.read(name, 10)


def test_a_segment_whose_size_is_not_the_announced_one_is_refused_and_removed() -> None:
    segment = shm.Segment.write(serialize.dumps_result(b"s" * BIG))
    with pytest.raises(shm.SharedMemoryUnavailable, match="not the 5 announced"):
        shm.read(segment.name, 5, remove=False)
    assert (shm.SHM_DIR / segment.name).exists()  # a kept name is the holder's to remove
    with pytest.raises(shm.SharedMemoryUnavailable, match="not the 5 announced"):
        shm.read(segment.name, 5)
    assert not (shm.SHM_DIR / segment.name).exists()


def test_names_of_dead_processes_are_removed_and_of_live_ones_kept(tmp_path: Path) -> None:
    dead = shm.SHM_DIR / f"{shm.PREFIX}{2**22 + 12345}-1-0123abcd"  # no such pid
    live = shm.Segment.write(serialize.dumps_result(b"l" * 10))
    dead.write_bytes(b"x")
    try:
        assert shm.remove_orphans() >= 1
        assert not dead.exists() and (shm.SHM_DIR / live.name).exists()
        assert shm.remove_segments_of(os.getpid()) == 1
        assert not (shm.SHM_DIR / live.name).exists()
    finally:
        dead.unlink(missing_ok=True)
        live.remove()
