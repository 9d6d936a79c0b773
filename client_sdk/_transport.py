"""The client's transport: everything it needs from the network, behind one seam.

:class:`Transport` is that seam, a :class:`typing.Protocol`: the client's one
stream to the scheduler (:class:`SchedulerStream`), waiting until the
scheduler can be reached, the scheduler's unary calls as typed methods,
fetching a result from the worker that holds it, and closing. The client's
core (:mod:`client_sdk._core`) sees nothing else of the network, so a test
can hand it a stub (``tests/helpers/stub_transport.py``) and play the
scheduler itself.

:class:`GrpcTransport` is the real one, over grpc.aio. Every gRPC error it
meets leaves it as an SDK exception (:mod:`client_sdk._grpc_errors`).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import Any, Protocol

import grpc

from apportion_common.security import TLS, ClientSecurity, tls_from_paths
from apportion_common.serialize import Frames
from apportion_common.settings import SecuritySettings
from apportion_common.transfer import ChannelPool
from apportion_common.uploads import UploadError
from apportion_common.wrong_peer import not_a_scheduler
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from ._grpc_errors import (
    Caller,
    access_error,
    mapped_call_errors,
    stream_error,
    unreachable,
    why_unreachable,
    wrong_peer,
)

#: While connecting, how often to look at why the channel is not ready yet.
PROBE_EVERY_S = 1.0


class SchedulerStream(Protocol):
    """The client's stream to the scheduler, once opened.

    ``write``, ``read`` and ``done_writing`` raise
    :class:`~client_sdk._grpc_errors.StreamBroken` when the stream fails.
    """

    async def write(self, message: pb.ClientToScheduler) -> None: ...

    async def read(self) -> pb.SchedulerToClient | None:
        """The next message; None once the scheduler has ended the stream."""
        ...

    async def done_writing(self) -> None:
        """End our side: the scheduler ends the stream once it has read that."""
        ...

    def cancel(self) -> None: ...


class Transport(Protocol):
    """Everything the client needs from the network."""

    @property
    def address(self) -> str:
        """The scheduler's ``host:port``."""
        ...

    async def connect(self, timeout: float) -> None:
        """Return once the scheduler answers and accepts this client's
        credentials; else raise SchedulerConnectionError saying why."""
        ...

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the scheduler can be reached again; False if it could
        not be within ``timeout`` seconds."""
        ...

    def open_stream(self) -> SchedulerStream: ...

    async def get_cluster_state(
        self, request: pb.GetClusterStateRequest, timeout: float
    ) -> pb.ClusterState: ...

    async def set_worker_resources(
        self, request: pb.SetWorkerResourcesRequest, timeout: float
    ) -> pb.SetWorkerResourcesReply: ...

    async def explain_task(
        self, request: pb.ExplainTaskRequest, timeout: float
    ) -> pb.ExplainTaskReply: ...

    async def retire_workers(
        self, request: pb.RetireWorkersRequest, timeout: float
    ) -> pb.RetireWorkersReply: ...

    async def upload_file(self, request: pb.UploadFileRequest, timeout: float) -> None: ...

    async def restart(self, request: pb.RestartRequest, timeout: float) -> pb.RestartReply: ...

    async def shutdown(self, request: pb.ShutdownRequest, timeout: float) -> None: ...

    async def get_logs(self, request: pb.GetLogsRequest, timeout: float) -> pb.GetLogsReply:
        """The scheduler's newest log lines."""
        ...

    async def get_worker_logs(
        self, address: str, request: pb.GetLogsRequest, timeout: float
    ) -> pb.GetLogsReply:
        """The newest log lines of the worker at ``address``."""
        ...

    async def run_function(
        self, address: str, request: pb.RunFunctionRequest, timeout: float
    ) -> pb.RunFunctionReply:
        """Call a function on the worker at ``address`` (client.run)."""
        ...

    async def upload_to_worker(
        self, address: str, request: pb.UploadFileRequest, timeout: float
    ) -> None:
        """Raise :class:`~apportion_common.uploads.UploadError` naming the
        worker if the file does not import there."""
        ...

    async def fetch(self, address: str, key: str, nbytes: int = 0) -> Frames:
        """The result of ``key`` (``nbytes`` large, 0 if unknown) from the
        worker at ``address``; raise
        :class:`~apportion_common.transfer.ResultUnavailable` if it has none."""
        ...

    async def close(self) -> None: ...


def client_security(address: Any, token: str | None, tls: TLS | None) -> ClientSecurity:
    """Explicit arguments, else a LocalCluster's own, else the environment's."""
    if token is None and tls is None:
        token, tls = getattr(address, "token", None), getattr(address, "tls", None)
    if token is None or tls is None:
        env = SecuritySettings()
        if token is None:
            token = env.client_role_token
        if tls is None:
            tls = tls_from_paths(env.tls_ca, env.tls_cert, env.tls_key)
    return ClientSecurity(token, tls)


class GrpcTransport:
    """The transport over grpc.aio: one channel to the scheduler, and one per
    worker results are fetched from. ``caller`` words its error messages (a
    Client's, or an operator command's)."""

    def __init__(
        self,
        address: str,
        security: ClientSecurity | None = None,
        caller: Caller = Caller.CLIENT,
    ) -> None:
        self._address = address
        #: The token and TLS every call presents (to the scheduler and to workers).
        self.security = security or ClientSecurity()
        self._caller = caller
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SchedulerStub | None = None
        self._peers = ChannelPool(self.security)

    @property
    def address(self) -> str:
        return self._address

    def _ensure_channel(self) -> grpc.aio.Channel:
        # Made on first use: a grpc.aio channel belongs to the loop it is made on.
        if self._channel is None:
            self._channel = self.security.aio_channel(self._address)
            self._stub = pb_grpc.SchedulerStub(self._channel)
        return self._channel

    @property
    def _scheduler(self) -> pb_grpc.SchedulerStub:
        if self._stub is None:
            self._ensure_channel()
        assert self._stub is not None
        return self._stub

    async def connect(self, timeout: float) -> None:
        stub = self._scheduler
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.wait_ready(min(PROBE_EVERY_S, max(deadline - loop.time(), 0))):
            failed = await self._probe()
            found = None if failed is None else not_a_scheduler(failed)
            if found is not None:
                # It answers but is no scheduler, and will never become one:
                # say so now rather than when the timeout runs out.
                raise wrong_peer(self._address, found)
            if loop.time() >= deadline:
                why = (
                    "" if failed is None else why_unreachable(failed, self.security.tls is not None)
                )
                raise unreachable(self._address, timeout, why)
        # One unary call, so that a refused token fails Client() itself (on
        # the stream, a refusal would show only once it is read, later).
        try:
            await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise access_error(exc, self._address, self.security.token is not None) from None

    async def _probe(self) -> grpc.RpcError | None:
        """The error of one quick call that does not wait for the channel:
        why it never got ready (a TLS handshake refused, say)."""
        try:
            await self._scheduler.GetClusterState(
                pb.GetClusterStateRequest(), timeout=2, wait_for_ready=False
            )
        except grpc.RpcError as exc:
            return exc
        return None

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ensure_channel().channel_ready(), timeout)
        except (grpc.RpcError, TimeoutError):
            return False
        return True

    def open_stream(self) -> SchedulerStream:
        # Metadata at the open, not a stream interceptor (see ClientSecurity).
        return _GrpcStream(self._scheduler.ClientStream(metadata=self.security.metadata))

    async def get_cluster_state(
        self, request: pb.GetClusterStateRequest, timeout: float
    ) -> pb.ClusterState:
        with self._mapped("GetClusterState"):
            reply: pb.ClusterState = await self._scheduler.GetClusterState(request, timeout=timeout)
        return reply

    async def set_worker_resources(
        self, request: pb.SetWorkerResourcesRequest, timeout: float
    ) -> pb.SetWorkerResourcesReply:
        with self._mapped("SetWorkerResources"):
            reply: pb.SetWorkerResourcesReply = await self._scheduler.SetWorkerResources(
                request, timeout=timeout
            )
        return reply

    async def retire_workers(
        self, request: pb.RetireWorkersRequest, timeout: float
    ) -> pb.RetireWorkersReply:
        with self._mapped("RetireWorkers"):
            reply: pb.RetireWorkersReply = await self._scheduler.RetireWorkers(
                request, timeout=timeout
            )
        return reply

    async def upload_file(self, request: pb.UploadFileRequest, timeout: float) -> None:
        with self._mapped("UploadFile"):
            await self._scheduler.UploadFile(request, timeout=timeout)

    async def restart(self, request: pb.RestartRequest, timeout: float) -> pb.RestartReply:
        with self._mapped("Restart"):
            reply: pb.RestartReply = await self._scheduler.Restart(request, timeout=timeout)
        return reply

    async def shutdown(self, request: pb.ShutdownRequest, timeout: float) -> None:
        with self._mapped("Shutdown"):
            await self._scheduler.Shutdown(request, timeout=timeout)

    async def get_logs(self, request: pb.GetLogsRequest, timeout: float) -> pb.GetLogsReply:
        with self._mapped("GetLogs"):
            reply: pb.GetLogsReply = await self._scheduler.GetLogs(request, timeout=timeout)
        return reply

    async def get_worker_logs(
        self, address: str, request: pb.GetLogsRequest, timeout: float
    ) -> pb.GetLogsReply:
        with self._mapped_at(address, "GetLogs"):
            reply: pb.GetLogsReply = await self._peers.stub(address).GetLogs(
                request, timeout=timeout
            )
        return reply

    async def run_function(
        self, address: str, request: pb.RunFunctionRequest, timeout: float
    ) -> pb.RunFunctionReply:
        with self._mapped_at(address, "RunFunction"):
            reply: pb.RunFunctionReply = await self._peers.stub(address).RunFunction(
                request, timeout=timeout
            )
        return reply

    async def upload_to_worker(
        self, address: str, request: pb.UploadFileRequest, timeout: float
    ) -> None:
        try:
            await self._peers.stub(address).UploadFile(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UploadError(f"on the worker at {address}: {exc.details()}") from None
            with self._mapped_at(address, "UploadFile"):
                raise

    def _mapped_at(self, address: str, method: str) -> AbstractContextManager[None]:
        """Errors of a call on the worker at ``address``, as the SDK's."""
        return mapped_call_errors(method, address, self.security.token is not None, self._caller)

    async def explain_task(
        self, request: pb.ExplainTaskRequest, timeout: float
    ) -> pb.ExplainTaskReply:
        with self._mapped("ExplainTask"):
            reply: pb.ExplainTaskReply = await self._scheduler.ExplainTask(request, timeout=timeout)
        return reply

    def _mapped(self, method: str) -> AbstractContextManager[None]:
        return mapped_call_errors(
            method, self._address, self.security.token is not None, self._caller
        )

    async def fetch(self, address: str, key: str, nbytes: int = 0) -> Frames:
        return await self._peers.fetch(address, key, nbytes=nbytes)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        await self._peers.close()


class _GrpcStream:
    """A ClientStream call, its gRPC errors raised as StreamBroken."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    async def write(self, message: pb.ClientToScheduler) -> None:
        try:
            await self._call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            raise stream_error(exc) from None

    async def read(self) -> pb.SchedulerToClient | None:
        try:
            msg = await self._call.read()
        except grpc.RpcError as exc:
            raise stream_error(exc) from None
        if msg is grpc.aio.EOF:
            return None
        reply: pb.SchedulerToClient = msg
        return reply

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            raise stream_error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()
