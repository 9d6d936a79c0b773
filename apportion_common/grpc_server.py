"""gRPC plumbing both services share: options, health, reflection, signals."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

#: Large enough for a batch of task payloads; results never travel in one
#: message (they are streamed in chunks), so this bounds only metadata.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Notice a dead peer on an idle stream within seconds, not hours.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # 1 MiB HTTP/2 frames, not 16 KiB: a result's 1 MiB chunk is one frame,
    # not 64 (cross-host hand-offs measured ~10 % faster).
    ("grpc.http2.max_frame_size", 1 << 20),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


class ServingHealth:
    """grpc.health.v1 for a server: NOT_SERVING until :meth:`serving` is called."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self._names = ["", *service_names]
        self._servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        reflection.enable_server_reflection(
            [*self._names[1:], health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)


def make_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A server; ``interceptors`` see every call first (security.AuthInterceptor)."""
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors) or None)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind ``host:port`` (port 0 picks one) and return the port, or raise OSError.

    With ``credentials`` (security.TLS.server_credentials) the port speaks TLS only.
    """
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound: int = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        # grpc's own text only says to turn its debug log on: ask the OS why.
        raise OSError(f"cannot listen on {host}:{port}: {_why_not(host, port) or exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: {_why_not(host, port) or 'refused'}")
    return bound


def _why_not(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound ("Address already in use"), or None."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def install_stop_signals(stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
    """Set ``stop`` on SIGINT or SIGTERM (long-running commands stop cleanly);
    with ``drain``, SIGTERM sets that instead, and a second SIGTERM ``stop``."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_sigterm() -> None:
        if drain is None or drain.is_set():
            stop.set()
        else:
            drain.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
