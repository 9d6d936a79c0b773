"""Fetching results from a real Worker service (in-process, port 0)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel, make_server
from apportion_common.transfer import STRIPE_MIN_BYTES, STRIPES, ChannelPool, ResultUnavailable
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from worker_service.servicer import WorkerServicer, add_worker_service
from worker_service.store import ResultStore


@pytest.fixture
def served(worker_server: tuple[ResultStore, str]) -> tuple[ResultStore, str]:
    return worker_server


async def test_a_large_result_arrives_whole_and_its_buffers_uncopied(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    value = {"blob": b"x" * (3 * 1024 * 1024 + 11), "array": bytearray(b"y" * 200_000)}
    store.put("k", 1, serialize.dumps_result(value["blob"]))
    store.put("small", 1, serialize.dumps_result(value))
    pool = ChannelPool()
    try:
        frames = await pool.fetch(address, "k", timeout=10)
        assert len(frames.buffers) == 1
        assert serialize.loads(frames) == value["blob"]
        assert serialize.loads(await pool.fetch(address, "small", timeout=10)) == value
        with pytest.raises(ResultUnavailable, match="NOT_FOUND"):
            await pool.fetch(address, "nope", timeout=10)
    finally:
        await pool.close()


async def test_a_value_of_known_large_size_comes_striped_over_two_connections(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    value = (b"x" * (STRIPE_MIN_BYTES + 5), {"info": 1}, bytearray(b"y" * (3 * 1024 * 1024 + 1)))
    frames = serialize.dumps_result(value)
    store.put("big", 1, frames)
    pool = ChannelPool()
    try:
        got = await pool.fetch(address, "big", timeout=10, nbytes=frames.nbytes)
        assert serialize.loads(got) == value
        assert len(got.buffers) == 2  # each buffer its own, not copied into the pickle
        assert len(pool._channels) == STRIPES  # one channel (connection) per stripe
        with pytest.raises(ResultUnavailable, match="NOT_FOUND"):
            await pool.fetch(address, "gone", timeout=10, nbytes=frames.nbytes)
    finally:
        await pool.close()


async def test_the_stream_is_plain_result_chunks_to_a_generated_stub(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    frames = serialize.dumps_result(b"z" * (2 * 1024 * 1024))
    store.put("k", 1, frames)
    async with insecure_channel(address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        got = [c async for c in stub.FetchResult(pb.FetchResultRequest(key="k"))]
    assert {c.total_size for c in got} == {frames.nbytes}
    data = b"".join(c.data for c in got)
    assert serialize.loads(data) == b"z" * (2 * 1024 * 1024)


async def test_many_small_results_come_in_one_call_and_the_rest_are_left_out(
    served: tuple[ResultStore, str],
) -> None:
    store, address = served
    for i in range(200):
        store.put(f"part-{i}", 1, serialize.dumps_result([i] * 10))
    framed = serialize.dumps_result(bytearray(b"b" * 100_000))  # a buffer kept apart
    assert framed.buffers
    store.put("framed", 1, framed)
    store.put("large", 1, serialize.dumps_result(b"L" * 300_000))
    pool = ChannelPool()
    try:
        keys = [f"part-{i}" for i in range(200)] + ["framed", "large", "gone"]
        found = await pool.fetch_small(address, keys, 200_000, timeout=10)
        # Every small one that is there, the framed one whole; not the large
        # one (over max_bytes) nor the one not there.
        assert sorted(found) == sorted(keys[:201])
        assert [serialize.loads(found[f"part-{i}"]) for i in range(200)] == [
            [i] * 10 for i in range(200)
        ]
        assert serialize.loads(found["framed"]) == bytearray(b"b" * 100_000)
    finally:
        await pool.close()


async def test_a_reply_stops_at_its_size_limit_and_bad_keys_are_refused(
    served: tuple[ResultStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_service.servicer as servicer

    store, address = served
    monkeypatch.setattr(servicer, "BATCH_FETCH_REPLY_BYTES", 25_000)
    for i in range(5):
        store.put(f"k{i}", 1, serialize.dumps_result(b"v" * 10_000))
    async with insecure_channel(address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        reply = await stub.FetchResults(
            pb.FetchResultsRequest(keys=[f"k{i}" for i in range(5)], max_bytes=1 << 20)
        )
        assert [r.key for r in reply.results] == ["k0", "k1"]  # the rest by FetchResult
        for keys, detail in [([""], "keys[0] is empty"), (["ok", "x" * 5000], "keys[1]")]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.FetchResults(pb.FetchResultsRequest(keys=keys, max_bytes=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert detail in (info.value.details() or "")


class _OneStripeFails(WorkerServicer):
    """A holder whose second stripe breaks off after its first chunk."""

    async def FetchResult(
        self, request: pb.FetchResultRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in super().FetchResult(request, context):
            if request.stripe == 1 and sent == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the holder went away")
            sent += 1
            yield chunk


async def test_a_stripe_that_breaks_off_fails_the_fetch_and_stops_the_others() -> None:
    store = ResultStore()
    server = make_server()
    add_worker_service(_OneStripeFails(store), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    pool = ChannelPool()
    try:
        frames = serialize.dumps_result(b"q" * (2 * STRIPE_MIN_BYTES))
        store.put("big", 1, frames)
        with pytest.raises(ResultUnavailable, match="UNAVAILABLE: the holder went away"):
            await pool.fetch(address, "big", timeout=10, nbytes=frames.nbytes)
        # Unstriped, the same holder still serves it whole.
        assert serialize.loads(await pool.fetch(address, "big", timeout=10)) == b"q" * (
            2 * STRIPE_MIN_BYTES
        )
    finally:
        await pool.close()
        await server.stop(0)
