"""Results spilled to disk, fetched from a real Worker service (in-process,
port 0): streamed from their files a chunk at a time (striped too), in
batches of small ones, never through shared memory, and whole even when
released while they stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel
from apportion_common.transfer import STRIPE_MIN_BYTES, ChannelPool, NotShared
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from tests.helpers.worker_service_server import serving
from worker_service.spill import SpillDirectory
from worker_service.store import ResultStore


@pytest.fixture
async def spilling(tmp_path: Path) -> AsyncIterator[tuple[ResultStore, str]]:
    store = ResultStore(SpillDirectory(tmp_path))
    try:
        async with serving(store) as address:
            yield store, address
    finally:
        store.clear()


async def test_spilled_results_stream_from_disk_whole(
    spilling: tuple[ResultStore, str],
) -> None:
    store, address = spilling
    big = (b"x" * (STRIPE_MIN_BYTES + 5), bytearray(b"y" * (3 * 1024 * 1024 + 1)))
    frames = serialize.dumps_result(big)
    store.put("big", 1, frames)
    store.put("small", 2, serialize.dumps_result({"n": 1}))
    store.put("tiny", 3, serialize.dumps_result(2))
    assert store.spill(10**10) > 0 and store.managed == 0
    pool = ChannelPool()
    try:
        assert serialize.loads(await pool.fetch(address, "big", timeout=10)) == big
        striped = await pool.fetch(address, "big", timeout=10, nbytes=frames.nbytes)
        assert serialize.loads(striped) == big
        small = await pool.fetch_small(address, ["small", "tiny"], 1024)
        assert {k: serialize.loads(v) for k, v in small.items()} == {"small": {"n": 1}, "tiny": 2}
        with pytest.raises(NotShared):
            await pool.share(address, "big")  # a segment would bring it back into memory
    finally:
        await pool.close()
    assert store.managed == 0  # served, not taken back


async def test_a_spilled_result_released_while_it_streams_arrives_whole(
    spilling: tuple[ResultStore, str],
) -> None:
    store, address = spilling
    value = b"z" * (3 * 1024 * 1024)
    store.put("k", 1, serialize.dumps_result(value))
    store.spill(10**10)
    async with insecure_channel(address) as channel:
        stream = pb_grpc.WorkerStub(channel).FetchResult(pb.FetchResultRequest(key="k"))
        first = await anext(aiter(stream))
        store.release("k")  # its file's name goes; the stream's descriptor reads on
        rest = [c async for c in stream]
    assert serialize.loads(b"".join(c.data for c in [first, *rest])) == value
