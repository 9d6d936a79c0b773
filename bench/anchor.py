"""The floor: what a bare grpc.aio server and client do on this machine.

apportion's figures are only as good as the transport beneath them, so every
benchmark round also measures grpc.aio alone, in two processes on 127.0.0.1,
with none of apportion's code in the path:

- ``stream_msgs_per_s``: small protobuf messages (one task key each) on one
  bidirectional stream, the server echoing each one back, writes and reads
  pipelined (a message counts once it has come back);
- ``batch_items_per_s``: the same with 100 keys per message (items counted);
- ``unary_p50_ms`` / ``unary_p99_ms``: sequential unary round trips;
- ``bulk_MBps``: a 100 MB value the server already holds, streamed to the
  client in 1 MiB chunks (server-streaming, like Worker/FetchResult), raw
  bytes in and out (no protobuf), received by the client and counted;
- ``bulk_pb_MBps``: the same value as ``apportion.v1.ResultChunk`` protobuf
  messages, so the cost of protobuf on a bulk stream shows apart.

``python -m bench.anchor`` prints one JSON object of these figures;
``bench.run`` calls it once per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from protos import apportion_pb2 as pb

SERVICE = "anchor.Anchor"
N_STREAM = 20_000
N_BATCHES = 2_000
BATCH = 100
N_UNARY = 500
BULK_BYTES = 100 * 1000 * 1000
CHUNK_BYTES = 1024 * 1024
BULK_REPEATS = 3
OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
ROOT = Path(__file__).resolve().parent.parent


def _identity(data: bytes) -> bytes:
    return data


# ------------------------------------------------------------------ server


class _Bulk:
    """The value the server streams, cut once per chunk size (serving copies nothing more)."""

    def __init__(self, nbytes: int) -> None:
        self.blob = b"x" * nbytes
        self._cut: dict[int, list[bytes]] = {}

    def pieces(self, chunk: int) -> list[bytes]:
        if chunk not in self._cut:
            view = memoryview(self.blob)
            self._cut[chunk] = [bytes(view[i : i + chunk]) for i in range(0, len(view), chunk)]
        return self._cut[chunk]


async def _serve() -> None:
    bulk = _Bulk(BULK_BYTES)
    bulk.pieces(CHUNK_BYTES)

    async def echo(
        requests: AsyncIterator[pb.KeyList], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.KeyList]:
        async for msg in requests:
            yield msg

    async def ping(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    async def raw(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        for piece in bulk.pieces(int(request or CHUNK_BYTES)):
            yield piece

    async def protobuf(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ResultChunk]:
        # What a protobuf server must do per chunk: a bytes slice, a message.
        view, total = memoryview(bulk.blob), len(bulk.blob)
        for start in range(0, total, CHUNK_BYTES):
            yield pb.ResultChunk(total_size=total, data=bytes(view[start : start + CHUNK_BYTES]))

    handlers = {
        "Echo": grpc.stream_stream_rpc_method_handler(
            echo,
            request_deserializer=pb.KeyList.FromString,
            response_serializer=pb.KeyList.SerializeToString,
        ),
        "Ping": grpc.unary_unary_rpc_method_handler(ping, _identity, _identity),
        "Bulk": grpc.unary_stream_rpc_method_handler(raw, _identity, _identity),
        "BulkPb": grpc.unary_stream_rpc_method_handler(
            protobuf, _identity, pb.ResultChunk.SerializeToString
        ),
    }
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    # Serve until the client closes our stdin (or kills us).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


# ------------------------------------------------------------------ client


async def _stream_rate(channel: grpc.aio.Channel, n: int, keys_per_msg: int) -> float:
    call = channel.stream_stream(
        f"/{SERVICE}/Echo",
        request_serializer=pb.KeyList.SerializeToString,
        response_deserializer=pb.KeyList.FromString,
    )()
    msgs = [pb.KeyList(keys=[f"noop-{i:032x}-{j}" for j in range(keys_per_msg)]) for i in range(n)]

    async def write() -> None:
        for msg in msgs:
            await call.write(msg)
        await call.done_writing()

    start = time.perf_counter()
    writer = asyncio.create_task(write())
    received = 0
    async for msg in call:
        received += len(msg.keys)
    await writer
    elapsed = time.perf_counter() - start
    assert received == n * keys_per_msg, f"echoed {received} of {n * keys_per_msg}"
    return received / elapsed


async def _unary(channel: grpc.aio.Channel, n: int) -> tuple[float, float]:
    ping = channel.unary_unary(
        f"/{SERVICE}/Ping", request_serializer=_identity, response_deserializer=_identity
    )
    for _ in range(50):  # warm up
        await ping(b"x" * 64)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await ping(b"x" * 64)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


async def _bulk(channel: grpc.aio.Channel, method: str, chunk_bytes: int = CHUNK_BYTES) -> float:
    deserializer = _identity if method == "Bulk" else pb.ResultChunk.FromString
    call = channel.unary_stream(
        f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=deserializer
    )
    request = str(chunk_bytes).encode()
    rates = []
    for _ in range(BULK_REPEATS):
        received = 0
        start = time.perf_counter()
        async for chunk in call(request):
            received += len(chunk) if isinstance(chunk, bytes) else len(chunk.data)
        elapsed = time.perf_counter() - start
        assert received == BULK_BYTES, f"{method}: got {received} of {BULK_BYTES} bytes"
        rates.append(BULK_BYTES / elapsed / 1e6)
    return statistics.median(rates)


async def measure(address: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        await _stream_rate(channel, 500, 1)  # warm up the stream path
        out = {
            "stream_msgs_per_s": await _stream_rate(channel, N_STREAM, 1),
            "batch_items_per_s": await _stream_rate(channel, N_BATCHES, BATCH),
        }
        out["unary_p50_ms"], out["unary_p99_ms"] = await _unary(channel, N_UNARY)
        out["bulk_MBps"] = await _bulk(channel, "Bulk")
        out["bulk_pb_MBps"] = await _bulk(channel, "BulkPb")
        return out


async def explore(address: str) -> dict[str, float]:
    """Bulk rate by chunk size, and on a fresh channel (a first fetch) against a warm one."""
    out = {}
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        for size in (256 * 1024, 1024 * 1024, 4 * 1024 * 1024):
            await _bulk(channel, "Bulk", size)  # cut on the server, outside the timing
        for size in (
            256 * 1024,
            1024 * 1024,
            4 * 1024 * 1024,
            256 * 1024,
            1024 * 1024,
            4 * 1024 * 1024,
        ):
            out[f"bulk_{size // 1024}KiB_MBps"] = await _bulk(channel, "Bulk", size)
    cold = []
    for _ in range(3):
        async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
            start = time.perf_counter()
            received = 0
            call = channel.unary_stream(f"/{SERVICE}/Bulk", _identity, _identity)
            async for chunk in call(str(CHUNK_BYTES).encode()):
                received += len(chunk)
            cold.append(received / (time.perf_counter() - start) / 1e6)
    out["bulk_fresh_channel_MBps"] = statistics.median(cold)
    return out


def run_anchor(timeout: float = 300, exploring: bool = False) -> dict[str, float]:
    """Start the server process, measure from this one, stop the server."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.anchor", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        line = server.stdout.readline().strip()
        if not line:
            raise RuntimeError("the anchor server did not start")
        how = explore if exploring else measure
        return asyncio.run(asyncio.wait_for(how(f"127.0.0.1:{int(line)}"), timeout))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure_in_subprocess(timeout: float = 300) -> dict[str, float]:
    """One anchor measurement, client and server both in fresh processes.

    ``bench.run`` already runs gRPC clients of its own; a fresh process keeps
    the anchor's client free of their threads and loops.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "bench.anchor"],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=True,
    )
    figures: dict[str, float] = json.loads(done.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help="run the server (internal)")
    parser.add_argument(
        "--explore", action="store_true", help="bulk rate by chunk size, fresh vs warm channel"
    )
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
    else:
        print(json.dumps(run_anchor(exploring=args.explore)))


if __name__ == "__main__":
    main()
