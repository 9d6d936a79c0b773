"""A client transport with no network: the test plays the scheduler.

:class:`StubTransport` implements :class:`client_sdk._transport.Transport`.
Each stream the client opens (:class:`StubStream`) records every message
the client writes; the test answers with ``TaskUpdate`` messages in any
order (:meth:`StubTransport.answer`), ends or breaks the stream, and says
which results the workers hold (:attr:`StubTransport.results`). Give it to
a client with ``Client("stub:1", _transport=stub)``.

Works for both clients: a synchronous one runs its loop in a thread of its
own, so answers are handed to the stream's loop thread-safely, and
:meth:`StubTransport.until` polls without blocking the caller's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from apportion_common import serialize
from apportion_common.serialize import Frames
from apportion_common.status import ErrorKind
from apportion_common.status_pb import ERROR_KIND_TO_PB
from apportion_common.transfer import ResultUnavailable
from client_sdk._grpc_errors import StreamBroken
from protos import apportion_pb2 as pb
from tests.helpers.processes import until

ADDRESS = "stub:1"
WORKER = "10.0.0.1:7000"


class StubStream:
    """One ClientStream: what the client wrote, and what the test answers."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._incoming: asyncio.Queue[pb.SchedulerToClient | StreamBroken | None] = asyncio.Queue()
        self.written: list[pb.ClientToScheduler] = []
        self.broken: StreamBroken | None = None
        self.done_writing_called = False
        self.cancelled = False

    async def write(self, message: pb.ClientToScheduler) -> None:
        if self.broken is not None:
            raise self.broken
        if self.done_writing_called:
            raise StreamBroken("the stream is closed for writing")
        copy = pb.ClientToScheduler()
        copy.CopyFrom(message)  # as sent: the client may reuse its messages
        self.written.append(copy)

    async def read(self) -> pb.SchedulerToClient | None:
        item = await self._incoming.get()
        if isinstance(item, StreamBroken):
            raise item
        return item

    async def done_writing(self) -> None:
        if self.broken is not None:
            raise self.broken
        self.done_writing_called = True
        self._put(None)  # the scheduler ends the stream once it read our end

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, item: pb.SchedulerToClient | StreamBroken | None) -> None:
        """From any thread: what the next read() returns (or raises)."""
        self._loop.call_soon_threadsafe(self._incoming.put_nowait, item)

    # ------------------------------------------------ what was written

    def of_kind(self, kind: str) -> list[pb.ClientToScheduler]:
        return [m for m in list(self.written) if m.WhichOneof("kind") == kind]

    def submitted(self) -> list[pb.TaskSpec]:
        return [spec for m in self.of_kind("submit") for spec in m.submit.tasks]

    def submitted_keys(self) -> list[str]:
        return [spec.key for spec in self.submitted()]

    def key_lists(self, kind: str) -> list[list[str]]:
        """The keys of each ``cancel`` or ``release`` message, one list per message."""
        return [list(getattr(m, kind).keys) for m in self.of_kind(kind)]


class StubTransport:
    """Everything the client needs from the network, played by the test."""

    def __init__(self, address: str = ADDRESS) -> None:
        self._address = address
        self.streams: list[StubStream] = []
        #: results the workers hold: (worker address, key) -> value
        self.results: dict[tuple[str, str], Any] = {}
        #: each fetch the client made: (worker address, key)
        self.fetches: list[tuple[str, str]] = []
        #: the size each fetch was told (a large result comes striped)
        self.fetch_sizes: list[int] = []
        #: what wait_ready() says (the scheduler reachable again)
        self.reachable = True
        #: raised by connect(), if set (a refused or unreachable scheduler)
        self.refusal: Exception | None = None
        self.cluster_state = pb.ClusterState(address=address)
        #: log lines the scheduler ("") and each worker (by address) answer, oldest first
        self.logs: dict[str, list[pb.LogLine]] = {}
        self.requests: list[Any] = []
        self.closed = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def stream(self) -> StubStream:
        """The stream the client opened last."""
        assert self.streams, "the client opened no stream"
        return self.streams[-1]

    # ------------------------------------------------ the Transport protocol

    async def connect(self, timeout: float) -> None:
        if self.refusal is not None:
            raise self.refusal

    async def wait_ready(self, timeout: float) -> bool:
        await asyncio.sleep(0)
        return self.reachable

    def open_stream(self) -> StubStream:
        stream = StubStream()
        self.streams.append(stream)
        return stream

    async def get_cluster_state(
        self, request: pb.GetClusterStateRequest, timeout: float
    ) -> pb.ClusterState:
        self.requests.append(request)
        return self.cluster_state

    async def set_worker_resources(
        self, request: pb.SetWorkerResourcesRequest, timeout: float
    ) -> pb.SetWorkerResourcesReply:
        self.requests.append(request)
        worker = pb.WorkerInfo(name=request.worker, address=WORKER, resources=request.resources)
        return pb.SetWorkerResourcesReply(worker=worker)

    async def upload_file(self, request: pb.UploadFileRequest, timeout: float) -> None:
        self.requests.append(request)

    async def restart(self, request: pb.RestartRequest, timeout: float) -> pb.RestartReply:
        self.requests.append(request)
        return pb.RestartReply(workers=list(self.cluster_state.workers))

    async def shutdown(self, request: pb.ShutdownRequest, timeout: float) -> None:
        self.requests.append(request)

    async def get_logs(self, request: pb.GetLogsRequest, timeout: float) -> pb.GetLogsReply:
        return self._logs("", request)

    async def get_worker_logs(
        self, address: str, request: pb.GetLogsRequest, timeout: float
    ) -> pb.GetLogsReply:
        return self._logs(address, request)

    def _logs(self, address: str, request: pb.GetLogsRequest) -> pb.GetLogsReply:
        self.requests.append(request)
        lines = self.logs.get(address, [])
        if request.HasField("n"):
            lines = lines[len(lines) - request.n :] if request.n else []
        return pb.GetLogsReply(lines=lines)

    async def run_function(
        self, address: str, request: pb.RunFunctionRequest, timeout: float
    ) -> pb.RunFunctionReply:
        """Runs the function here, as a worker would (no thread, no process)."""
        self.requests.append(request)
        fn, args, kwargs = serialize.loads(request.payload)
        try:
            return pb.RunFunctionReply(result=serialize.dumps(fn(*args, **kwargs)))
        except Exception as exc:
            info = serialize.error_info(exc)
            error = pb.TaskError(
                type_name=info.type_name, message=info.message, exception=info.exception
            )
            return pb.RunFunctionReply(error=error)

    async def upload_to_worker(
        self, address: str, request: pb.UploadFileRequest, timeout: float
    ) -> None:
        self.requests.append(request)

    async def retire_workers(
        self, request: pb.RetireWorkersRequest, timeout: float
    ) -> pb.RetireWorkersReply:
        self.requests.append(request)
        reply = pb.RetireWorkersReply()
        for worker in request.workers:
            reply.retired.add(name=worker, address=f"{worker}.stub:1")
        return reply

    async def explain_task(
        self, request: pb.ExplainTaskRequest, timeout: float
    ) -> pb.ExplainTaskReply:
        self.requests.append(request)
        return pb.ExplainTaskReply(explanation=f"task {request.key!r} is waiting for the test")

    async def fetch(self, address: str, key: str, nbytes: int = 0) -> Frames:
        self.fetches.append((address, key))
        self.fetch_sizes.append(nbytes)
        try:
            value = self.results[(address, key)]
        except KeyError:
            raise ResultUnavailable(f"{key!r} from {address}: not there") from None
        return serialize.dumps_result(value)

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------ playing the scheduler

    def answer(self, *updates: pb.TaskUpdate) -> None:
        """Send ``updates`` to the client, in one message, on the current stream."""
        self.stream._put(pb.SchedulerToClient(updates=list(updates)))

    def end_stream(self) -> None:
        """The scheduler ends the stream (as on its shutdown)."""
        self.stream._put(None)

    def break_stream(
        self, reason: str = "UNAVAILABLE: the test broke it", refused: bool = False
    ) -> None:
        """The stream fails: the client's pending read raises, and so does any write."""
        stream = self.stream
        stream.broken = StreamBroken(reason, refused=refused)
        stream._put(stream.broken)

    @contextmanager
    def loop_held(self) -> Iterator[None]:
        """Hold a synchronous client's loop thread for the block, as a long
        step of that loop would: what is handed to the loop meanwhile waits."""
        gate, holding = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            gate.wait(10)

        self.stream._loop.call_soon_threadsafe(hold)
        assert holding.wait(10), "the client's loop did not take the hold"
        try:
            yield
        finally:
            gate.set()

    async def until(
        self, predicate: Callable[[], object], what: str = "condition", timeout: float = 5.0
    ) -> None:
        """Wait (letting any loop run) until ``predicate()`` is true."""
        await until(predicate, what, timeout)


# ------------------------------------------------------------ the updates


def finished(
    key: str,
    value: Any = None,
    *,
    inline: bool = True,
    addresses: tuple[str, ...] = (WORKER,),
    nbytes: int = 0,
) -> pb.TaskUpdate:
    """``key`` finished: its result ``value`` sent inline, else held at ``addresses``."""
    return pb.TaskUpdate(
        key=key,
        status=pb.TASK_STATUS_FINISHED,
        addresses=addresses,
        nbytes=nbytes,
        inline_result=serialize.dumps(value) if inline else b"",
    )


def pending(key: str, waiting_reason: str = "") -> pb.TaskUpdate:
    return pb.TaskUpdate(key=key, status=pb.TASK_STATUS_PENDING, waiting_reason=waiting_reason)


def cancelled(key: str) -> pb.TaskUpdate:
    return pb.TaskUpdate(key=key, status=pb.TASK_STATUS_CANCELLED)


def erred(
    key: str,
    kind: ErrorKind,
    message: str = "it went wrong",
    type_name: str = "builtins.RuntimeError",
    exception: BaseException | None = None,
) -> pb.TaskUpdate:
    """``key`` failed; for ErrorKind.TASK, ``exception`` is the task's own (pickled)."""
    return pb.TaskUpdate(
        key=key,
        status=pb.TASK_STATUS_ERROR,
        error=pb.TaskError(
            type_name=type_name,
            message=message,
            traceback="Traceback (most recent call last):\n  (on the stub)\n",
            exception=serialize.dumps(exception) if exception is not None else b"",
            kind=ERROR_KIND_TO_PB[kind],
        ),
    )


async def resolve(value: Any) -> Any:
    """What a client call gives: awaited when the client is asynchronous.

    (A coroutine, not any awaitable: a Future is awaitable too.)
    """
    return await value if asyncio.iscoroutine(value) else value
