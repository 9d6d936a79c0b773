"""Results handed over in shared memory by a real Worker service (in-process, port 0)."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from apportion_common import serialize, shm
from apportion_common.grpc_server import make_server
from apportion_common.transfer import ChannelPool, ResultUnavailable
from protos import apportion_pb2 as pb
from worker_service.assignment import Assignment, InputLocation
from worker_service.inputs import SHARE_MIN_BYTES, InputFetcher
from worker_service.servicer import WorkerServicer, add_worker_service
from worker_service.store import ResultStore

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

BIG = SHARE_MIN_BYTES + 17


def our_segments() -> list[str]:
    """Names this process made (the in-process servicer is this process)."""
    return [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getpid()}-*")]


@pytest.fixture
async def served() -> AsyncIterator[tuple[ResultStore, str]]:
    store = ResultStore()
    server = make_server()
    add_worker_service(WorkerServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield store, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
    assert our_segments() == []


async def test_values_of_every_shape_come_through_a_segment_that_is_gone_after(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    values = {
        "bytes": b"b" * BIG,
        "tuple": (b"t" * BIG, {"meta": 1}),
        "arrays": {"a": np.arange(BIG // 8), "b": np.ones(BIG // 8)},
    }
    for key, value in values.items():
        store.put(key, 1, serialize.dumps_result(value))
    pool = ChannelPool()
    try:
        for key, value in values.items():
            frames = await pool.share(address, key)
            back = serialize.loads(frames)
            if key == "arrays":
                assert all((back[k] == value[k]).all() for k in value)  # type: ignore[index]
                back["a"][0] = 99  # a private mapping: writable, and ours alone
                assert serialize.loads(store.get(key))["a"][0] == 0  # type: ignore[arg-type]
            else:
                assert back == value
            assert our_segments() == []  # named only for the hand-off
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
    store.put("k", 1, serialize.dumps_result(b"k" * BIG))
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
    value = (b"f" * BIG, 1)
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
        assert not inputs.missing and serialize.loads(inputs.values["k"]) == value
    finally:
        await pool.close()


def test_only_apportion_segment_names_are_opened() -> None:
    for name in ("../../etc/passwd", "apportion-1-2", "other", "apportion-1-2-zzzzzzzz"):
        with pytest.raises(shm.SharedMemoryUnavailable, match="not an apportion segment"):
            shm.read(name, 10)


def test_a_segment_whose_size_is_not_the_announced_one_is_refused_and_removed() -> None:
    segment = shm.Segment.write(serialize.dumps_result(b"s" * BIG))
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
