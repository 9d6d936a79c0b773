"""The client: submit functions with resource needs, get futures back.

All network work happens in :class:`_ClientCore`, on one asyncio loop. The
asynchronous ``Client`` runs the core on the caller's loop; the synchronous
``Client`` runs it on a loop in a background thread and blocks on it, so it can
be used from several threads at once. Submissions and releases are queued and
written as batches on the client's one stream to the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from apportion_common import serialize
from apportion_common.resources import check_resources
from apportion_common.security import TLS, ClientSecurity, tls_from_paths
from apportion_common.settings import SecuritySettings
from apportion_common.status import ErrorKind
from apportion_common.status_pb import ERROR_KIND_FROM_PB, TASK_STATUS_FROM_PB
from apportion_common.transfer import ChannelPool, ResultUnavailable
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from ._errors import rebuild_exception
from .annotate import current_annotations
from .exceptions import FutureCancelledError, SchedulerConnectionError
from .future import Future

log = logging.getLogger("client_sdk")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
#: How long a client whose stream broke keeps trying to reach the scheduler
#: again before its pending futures fail with SchedulerConnectionError.
RECONNECT_TIMEOUT_S = 30.0
MAX_RECONNECT_BACKOFF_S = 2.0
#: Tasks per message when a reconnecting client submits its pending ones again.
RESUBMIT_BATCH = 5_000
#: Tasks of a map() handed to the client's loop at a time.
MAP_BATCH = 1_000
#: While fetching a result, how often to check that its holder still has it.
FETCH_RECHECK_S = 0.2
#: The same reason for waiting is logged at most once in this many seconds.
WAITING_WARNING_INTERVAL_S = 10.0
#: How long closing waits for the scheduler to acknowledge the goodbye.
GOODBYE_TIMEOUT_S = 2.0


@dataclass(slots=True)
class _KeyState:
    status: str = "pending"
    addresses: tuple[str, ...] = ()
    error: serialize.ErrorInfo | None = None
    waiting_reason: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: a small result sent along with "finished": no fetch needed
    inline_result: bytes = b""
    #: kept until the task finishes, to submit again should the scheduler
    #: restart without having it (a reconnect loses nothing)
    spec: pb.TaskSpec | None = None


def _client_security(address: Any, token: str | None, tls: TLS | None) -> ClientSecurity:
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


def _address_of(address: Any) -> str:
    """Accept ``"host:port"`` or anything with an ``.address`` (a LocalCluster)."""
    addr = getattr(address, "address", address)
    if not isinstance(addr, str) or ":" not in addr:
        raise ValueError(f"scheduler address must look like host:port, not {address!r}")
    return addr


class _ClientCore:
    """The client's state and its stream; every method runs on one loop."""

    def __init__(
        self,
        address: str,
        security: ClientSecurity | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.reconnect_timeout = reconnect_timeout
        #: The token and TLS every call presents (to the scheduler and to workers).
        self.security = security or ClientSecurity()
        self.client_id = f"client-{uuid.uuid4().hex}"
        self.keys: dict[str, _KeyState] = {}
        self._outgoing: list[pb.ClientToScheduler] = []
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peers = ChannelPool(self.security)
        self.closed = False
        self.lost: str | None = None
        self._reconnect_deadline: float | None = None
        #: why tasks wait (without their keys) -> when that was last logged
        self._warned: dict[str, float] = {}

    async def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        self._channel = self.security.aio_channel(self.address)
        try:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), timeout)
            except TimeoutError:
                why = await self._why_unreachable()
                raise SchedulerConnectionError(
                    f"no scheduler answered at {self.address} within {timeout:g}s{why}"
                ) from None
            await self._check_access(timeout)
        except BaseException:
            await self._channel.close()
            raise
        await self._open_stream()
        self._tasks = [
            asyncio.create_task(self._read_updates()),
            asyncio.create_task(self._write_batches()),
        ]

    async def _open_stream(self) -> None:
        """Open the stream and say hello. On a reconnect, name the keys whose
        futures this client holds (the scheduler tells their state again) and
        submit again the tasks still pending (a scheduler that restarted
        without them makes them anew; one that has them just answers)."""
        assert self._channel is not None
        # Metadata at the open, not a stream interceptor (see ClientSecurity).
        self._call = pb_grpc.SchedulerStub(self._channel).ClientStream(
            metadata=self.security.metadata
        )
        resume = [k for k, st in self.keys.items() if st.spec is None and st.status != "cancelled"]
        await self._call.write(
            pb.ClientToScheduler(hello=pb.ClientHello(client_id=self.client_id, resume_keys=resume))
        )
        again = [st.spec for st in self.keys.values() if st.spec is not None]
        for start in range(0, len(again), RESUBMIT_BATCH):
            batch = again[start : start + RESUBMIT_BATCH]
            await self._call.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=batch)))

    async def _reconnect(self) -> bool:
        """Reach the scheduler again, with backoff, for RECONNECT_TIMEOUT_S."""
        assert self._channel is not None
        # One budget from the first loss until a stream works again, so that
        # a scheduler that keeps ending new streams cannot keep us trying.
        if self._reconnect_deadline is None:
            self._reconnect_deadline = time.monotonic() + self.reconnect_timeout
        deadline = self._reconnect_deadline
        backoff = 0.05
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(backoff * (0.5 + random.random()), remaining))
            backoff = min(backoff * 2, MAX_RECONNECT_BACKOFF_S)
            try:
                await asyncio.wait_for(
                    self._channel.channel_ready(), max(0.1, deadline - time.monotonic())
                )
                await self._open_stream()
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                log.debug("reconnecting to %s: %s", self.address, exc)
                continue
            return True
        return False

    async def _check_access(self, timeout: float) -> None:
        """One unary call, so that a refused token fails ``Client()`` itself.

        (On the stream, a refusal would show only once it is read, later.)
        """
        assert self._channel is not None
        try:
            await pb_grpc.SchedulerStub(self._channel).GetClusterState(
                pb.GetClusterStateRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                sent = "a token it did not accept" if self.security.token else "no token"
                raise SchedulerConnectionError(
                    f"the scheduler at {self.address} refused this client "
                    f"(UNAUTHENTICATED: {exc.details()}); this client sent {sent}: "
                    "pass Client(..., token=...) or set APPORTION_TOKEN"
                ) from None
            raise SchedulerConnectionError(
                f"the scheduler at {self.address}: {exc.code().name}: {exc.details()}"
            ) from None

    async def _why_unreachable(self) -> str:
        """Why the channel never got ready (a TLS handshake refused, say), briefly."""
        assert self._channel is not None
        try:
            await pb_grpc.SchedulerStub(self._channel).GetClusterState(
                pb.GetClusterStateRequest(), timeout=2, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            tls = "TLS" if self.security.tls is not None else "plaintext (no TLS)"
            return f" ({exc.code().name}: {exc.details()}; this client used {tls})"
        return ""

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader, writers = (self._tasks[0], self._tasks[1:]) if self._tasks else (None, [])
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        if self._call is not None and self.lost is None:
            # Say goodbye: send what is still queued, then end our side. The
            # scheduler then drops this client's tasks at once, instead of
            # keeping them through the grace period it gives a broken stream.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                batch, self._outgoing = self._outgoing, []
                batch.append(pb.ClientToScheduler(goodbye=pb.ClientGoodbye()))
                for msg in _coalesce(batch):
                    await asyncio.wait_for(self._call.write(msg), GOODBYE_TIMEOUT_S)
                await asyncio.wait_for(self._call.done_writing(), GOODBYE_TIMEOUT_S)
                if reader is not None:
                    # The scheduler ends the stream once it has read our end.
                    await asyncio.wait_for(reader, GOODBYE_TIMEOUT_S)
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        await self._peers.close()

    # ------------------------------------------------------------ sending

    def _send(self, msg: pb.ClientToScheduler) -> None:
        self._outgoing.append(msg)
        self._wake.set()

    async def _write_batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outgoing = self._outgoing, []
            try:
                for msg in _coalesce(batch):
                    await self._call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream broke: the reader reconnects and starts a new
                # writer, which sends this batch again (a repeated submit or
                # release changes nothing).
                self._outgoing[:0] = batch
                return

    def submit(self, specs: list[pb.TaskSpec]) -> None:
        fresh = []
        for spec in specs:
            existing = self.keys.get(spec.key)
            # The scheduler forgets a cancelled task at once, so a key whose
            # task was cancelled names no task any more: submitting makes one.
            if existing is None or existing.status == "cancelled":
                self.keys[spec.key] = _KeyState(spec=spec)
                fresh.append(spec)
        if self.lost is not None:
            for spec in fresh:
                self._lose(spec.key)
            return
        if fresh:
            self._send(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=fresh)))

    def cancel(self, keys: list[str]) -> None:
        for key in keys:
            # Marked here, at once: the scheduler does not answer the one who
            # cancelled (the task is gone, or released for this client only).
            state = self.keys.get(key)
            if state is not None:
                state.status = "cancelled"
                state.spec = None
                state.changed.set()
        self._send(pb.ClientToScheduler(cancel=pb.KeyList(keys=keys)))

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.keys.pop(key, None)
        if not self.closed and self.lost is None:
            self._send(pb.ClientToScheduler(release=pb.KeyList(keys=keys)))

    # ---------------------------------------------------------- receiving

    async def _read_updates(self) -> None:
        while True:
            reason = "the scheduler closed the stream"
            code = None
            try:
                while True:
                    msg = await self._call.read()
                    if msg is grpc.aio.EOF:
                        break
                    self._reconnect_deadline = None  # this stream works
                    for update in msg.updates:
                        self._apply(update)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason = f"{code.name}: {exc.details()}"
            except asyncio.CancelledError:
                return
            if self.closed:
                return
            if code != grpc.StatusCode.UNAUTHENTICATED:
                log.warning(
                    "lost the scheduler at %s (%s); reconnecting for up to %gs",
                    self.address,
                    reason,
                    self.reconnect_timeout,
                )
                if await self._reconnect():
                    log.info("reconnected to the scheduler at %s", self.address)
                    self._tasks.append(asyncio.create_task(self._write_batches()))
                    self._wake.set()
                    continue
            break
        self.lost = f"lost the scheduler at {self.address} ({reason})"
        log.error("%s", self.lost)
        for key, state in self.keys.items():
            if state.status == "pending":
                self._lose(key)

    def _lose(self, key: str) -> None:
        state = self.keys[key]
        state.status = "error"
        state.error = serialize.ErrorInfo(
            "SchedulerConnectionError", self.lost or "", kind=ErrorKind.SCHEDULER_CONNECTION
        )
        state.changed.set()

    def _apply(self, update: pb.TaskUpdate) -> None:
        state = self.keys.get(update.key)
        if state is None:
            return  # released by us meanwhile
        status = TASK_STATUS_FROM_PB.get(update.status)
        if status is None:
            # Not "pending": a status this client does not know (a newer
            # scheduler's, or a corrupt one) must not make a finished task wait.
            log.warning(
                "ignoring an update of task %r with unknown status %d", update.key, update.status
            )
            return
        if state.status == "cancelled":
            return  # cancelled here; a late update for the old task changes nothing
        state.status = status
        if status == "pending":
            state.changed.clear()
            state.inline_result = b""  # lost, being made again: wait for it
            if update.waiting_reason and update.waiting_reason != state.waiting_reason:
                self._warn_waiting(update.key, update.waiting_reason)
            state.waiting_reason = update.waiting_reason
            return
        state.spec = None  # finished or failed for good: never submitted again
        state.addresses = tuple(update.addresses)
        state.inline_result = update.inline_result
        if status == "error":
            state.error = serialize.ErrorInfo(
                update.error.type_name,
                update.error.message,
                update.error.traceback,
                update.error.exception,
                # A kind this client does not know (a newer scheduler's) is
                # shown as what it is called: a TaskError of that name.
                ERROR_KIND_FROM_PB.get(update.error.kind, ErrorKind.TASK),
            )
        state.changed.set()

    def _warn_waiting(self, key: str, reason: str) -> None:
        """Log why a task waits: once per reason and interval, not once per
        task (a map of 100,000 tasks that no worker fits would flood the log)."""
        general = reason.removeprefix(f"task {key!r}: ")
        now = time.monotonic()
        if (
            now - self._warned.get(general, -WAITING_WARNING_INTERVAL_S)
            < WAITING_WARNING_INTERVAL_S
        ):
            return
        self._warned[general] = now
        log.warning("%s; it waits until a worker that fits joins", reason)

    # ------------------------------------------------------------ results

    async def wait(self, key: str) -> _KeyState:
        state = self.keys.get(key)
        if state is None:
            raise KeyError(f"task {key!r} was released by this client")
        await state.changed.wait()
        return state

    async def result(self, key: str) -> Any:
        while True:
            state = await self.wait(key)
            _raise_if_failed(key, state)
            if state.inline_result:
                return serialize.loads(state.inline_result)
            tried = state.addresses
            for address in tried:
                try:
                    data = await self._fetch_while_current(state, address, key)
                except ResultUnavailable as exc:
                    log.debug("result of %s: %s", key, exc)
                    continue
                if data is None:
                    break  # the scheduler moved the result on: follow it
                return serialize.loads(data)
            # Every holder failed: the scheduler will notice the lost worker
            # and recompute; wait for the next state change. If that change
            # already came while we were fetching (new holders), do not clear
            # it, or we would wait for one that never comes.
            if state.changed.is_set() and state.status == "finished" and state.addresses == tried:
                state.changed.clear()
                await asyncio.sleep(0.05)

    def result_at_hand(self, key: str) -> Any:
        """The result of ``key`` if it needs neither waiting nor fetching (or
        its error, raised); else NOT_AT_HAND."""
        state = self.keys.get(key)
        if state is None or not state.changed.is_set():
            return NOT_AT_HAND
        _raise_if_failed(key, state)
        if state.inline_result:
            return serialize.loads(state.inline_result)
        return NOT_AT_HAND

    async def _fetch_while_current(
        self, state: _KeyState, address: str, key: str
    ) -> serialize.Frames | None:
        """Fetch ``key`` from ``address``, unless the scheduler says meanwhile
        that the result lives elsewhere now (its holder was declared lost):
        then None. A silent holder would otherwise keep us waiting until the
        connection's keepalive gives up, long after the recompute."""
        holders = state.addresses
        fetch = asyncio.ensure_future(self._peers.fetch(address, key))
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=FETCH_RECHECK_S)
                if done:
                    return fetch.result()
                if state.status != "finished" or state.addresses != holders:
                    return None
        finally:
            fetch.cancel()

    async def cluster_state(self) -> pb.ClusterState:
        state: pb.ClusterState = await self.unary("GetClusterState", pb.GetClusterStateRequest())
        return state

    async def unary(self, method: str, request: Any, timeout: float = 10) -> Any:
        """A unary call on the scheduler; gRPC errors become SDK exceptions here."""
        assert self._channel is not None
        call = getattr(pb_grpc.SchedulerStub(self._channel), method)
        try:
            return await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise KeyError(exc.details()) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from None
            raise SchedulerConnectionError(f"{method}: {code.name}: {exc.details()}") from None


def _coalesce(messages: list[pb.ClientToScheduler]) -> Iterable[pb.ClientToScheduler]:
    """Merge runs of the same kind into one message, keeping their order."""
    current: pb.ClientToScheduler | None = None
    current_kind = None
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if current is not None and kind == current_kind and kind in ("submit", "cancel", "release"):
            if kind == "submit":
                current.submit.tasks.extend(msg.submit.tasks)
            elif kind == "cancel":
                current.cancel.keys.extend(msg.cancel.keys)
            else:
                current.release.keys.extend(msg.release.keys)
            continue
        if current is not None:
            yield current
        current, current_kind = msg, kind
    if current is not None:
        yield current


def worker_info(w: pb.WorkerInfo) -> dict[str, Any]:
    return {
        "name": w.name,
        "nthreads": w.nthreads,
        "resources": dict(w.resources),
        "used_resources": dict(w.used_resources),
        "running": w.running,
        "queued": w.queued,
    }


def cluster_info(state: pb.ClusterState) -> dict[str, Any]:
    """``GetClusterState`` as the dict that ``Client.scheduler_info()`` returns."""
    return {
        "address": state.address,
        "workers": {w.address: worker_info(w) for w in state.workers},
        "tasks": dict(state.task_counts),
    }


@dataclass(frozen=True, slots=True)
class _TaskOptions:
    resources: dict[str, float]
    retries: int
    priority: int
    workers: tuple[str, ...]
    allow_other_workers: bool


def _raise_if_failed(key: str, state: _KeyState) -> None:
    if state.status == "cancelled":
        raise FutureCancelledError(key)
    if state.status == "error":
        assert state.error is not None
        raise rebuild_exception(state.error)


#: result_at_hand(): the result needs a wait or a fetch.
NOT_AT_HAND = object()


# --------------------------------------------------------------------- client


class Client:
    """Connect to a scheduler and run functions on its workers.

    ``Client(address)`` blocks; ``Client(address, asynchronous=True)`` is used
    with ``async with`` and its methods are coroutines.

    ``token`` (default: ``APPORTION_CLIENT_TOKEN``, else ``APPORTION_TOKEN``)
    is sent as ``authorization: Bearer TOKEN`` on every call; ``tls`` (a
    :class:`TLS`, default from ``APPORTION_TLS_CA/CERT/KEY``) turns on mutual
    TLS. ``Client(cluster)`` uses a LocalCluster's own when given neither.

    If the stream to the scheduler breaks (a network blip, a scheduler
    restart), the client reconnects with backoff for ``reconnect_timeout``
    seconds and its futures carry on; only then do pending ones fail with
    SchedulerConnectionError.
    """

    def __init__(
        self,
        address: Any,
        *,
        asynchronous: bool = False,
        timeout: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
        tls: TLS | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        self.address = _address_of(address)
        self._reconnect_timeout = reconnect_timeout
        self._security = _client_security(address, token, tls)
        self.asynchronous = asynchronous
        self._timeout = timeout
        self._refs: Counter[str] = Counter()
        self._refs_lock = threading.Lock()
        #: keys no future refers to any more, released together (_unref)
        self._unreferenced: list[str] = []
        #: the batch of submits not yet on the loop: (_scheduled when it
        #: began, its specs); see _submit_specs
        self._submitting: tuple[int, list[pb.TaskSpec]] | None = None
        self._submit_lock = threading.Lock()
        #: how many other things were handed to the loop so far
        self._scheduled = 0
        self._key_prefix = secrets.token_hex(8)
        self._key_numbers = itertools.count()
        self._core: _ClientCore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if not asynchronous:
            self._start_loop_thread()
            self._core = _ClientCore(self.address, self._security, self._reconnect_timeout)
            try:
                self._sync(self._core.connect(timeout))
            except BaseException:
                self._stop_loop_thread()
                raise

    # ---------------------------------------------------------- lifecycle

    def _start_loop_thread(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="apportion-client", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop

    def _stop_loop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            # Results still being awaited (the rest of a gather that failed
            # early, a result() that timed out) end here, not with the loop.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
        self._loop = None

    async def _aconnect(self) -> Client:
        self._loop = asyncio.get_running_loop()
        self._core = _ClientCore(self.address, self._security, self._reconnect_timeout)
        await self._core.connect(self._timeout)
        return self

    def __await__(self) -> Any:
        return self._aconnect().__await__()

    async def __aenter__(self) -> Client:
        if self._core is None:
            await self._aconnect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._aclose()

    def __enter__(self) -> Client:
        if self.asynchronous:
            raise TypeError("an asynchronous Client is used with 'async with'")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _aclose(self) -> None:
        if self._core is not None:
            await self._core.close()

    def close(self) -> Any:
        """Close the stream (the scheduler releases this client's tasks)."""
        if self.asynchronous:
            return self._aclose()
        if self._loop is not None and self._core is not None and not self._core.closed:
            self._sync(self._core.close())
        self._stop_loop_thread()
        return None

    def __del__(self) -> None:
        try:
            if not self.asynchronous and self._loop is not None:
                self.close()
        except Exception:
            pass

    # -------------------------------------------------------------- plumbing

    @property
    def core(self) -> _ClientCore:
        if self._core is None:
            raise RuntimeError("the client is not connected (use 'async with' or 'await')")
        return self._core

    def _sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        assert self._loop is not None
        self._scheduled += 1  # submits after this one go in a batch of their own
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FuturesTimeout:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout}s") from None

    def _submit_specs(self, specs: list[pb.TaskSpec]) -> None:
        """Submit ``specs`` on the client's loop, in the order of all calls.

        From the caller's thread, submissions made one after another join one
        batch and one loop wake-up, until anything else is handed to the loop
        (which then comes after the batch, as it was called after it). A loop of
        400 submits used to wake the loop 400 times, each time taking the GIL
        from the submitting thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the client is closed")
        if self.asynchronous:
            self.core.submit(specs)
            return
        with self._submit_lock:
            batch = self._submitting
            if batch is not None and batch[0] == self._scheduled:
                batch[1].extend(specs)
                return
            batch = self._submitting = (self._scheduled, list(specs))
        loop.call_soon_threadsafe(self._submit_batch, batch)

    def _submit_batch(self, batch: tuple[int, list[pb.TaskSpec]]) -> None:
        with self._submit_lock:
            if self._submitting is batch:
                self._submitting = None  # later submits start a new batch
        self.core.submit(batch[1])

    def _maybe_async(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> Any:
        if self.asynchronous:
            return coro if timeout is None else asyncio.wait_for(coro, timeout)
        return self._sync(coro, timeout)

    def _ref(self, key: str) -> None:
        with self._refs_lock:
            self._refs[key] += 1

    def _unref(self, key: str) -> None:
        with self._refs_lock:
            self._refs[key] -= 1
            if self._refs[key] > 0:
                return
            del self._refs[key]
            self._unreferenced.append(key)
            if len(self._unreferenced) > 1:
                return  # a release of the keys so far is on its way already
        core, loop = self._core, self._loop
        if core is not None and not core.closed and loop is not None and not loop.is_closed():
            try:
                if self.asynchronous:
                    loop.call_soon(self._release_unreferenced)
                else:
                    self._scheduled += 1
                    loop.call_soon_threadsafe(self._release_unreferenced)
            except RuntimeError:
                pass  # the loop closed meanwhile

    def _release_unreferenced(self) -> None:
        """On the loop: release every key whose last future went since the
        last call, in one message (dropping a list of 20,000 futures used to
        cost 20,000 loop wake-ups and messages)."""
        with self._refs_lock:
            keys, self._unreferenced = self._unreferenced, []
            # A key submitted again since (key=...) has a future again: keep it.
            keys = [key for key in keys if key not in self._refs]
        core, loop = self._core, self._loop
        if not keys or core is None or core.closed or loop is None:
            return
        # A key submitted and dropped at once has its submit queued behind
        # this call: release it after that, or the task would outlive its future.
        unsent = [key for key in keys if key not in core.keys]
        if unsent:
            loop.call_soon(core.release, unsent)
            keys = [key for key in keys if key in core.keys]
        if keys:
            core.release(keys)

    # --------------------------------------------------------------- submit

    def _options(
        self,
        resources: Mapping[str, float | str] | None,
        retries: int | None,
        priority: int | None,
        workers: str | Iterable[str] | None,
        allow_other_workers: bool,
    ) -> _TaskOptions:
        """Resolve annotate() defaults and check the options, once per call."""
        notes = current_annotations()
        needs = check_resources(resources) if resources is not None else notes.resources
        retries = notes.retries if retries is None else retries
        priority = notes.priority if priority is None else priority
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        names = (workers,) if isinstance(workers, str) else tuple(workers or ())
        if allow_other_workers and not names:
            raise ValueError("allow_other_workers=True needs workers=[...] to prefer")
        return _TaskOptions(needs, retries or 0, priority or 0, names, allow_other_workers)

    def _spec(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None,
        options: _TaskOptions,
        function: serialize.PickledFunction | None = None,
    ) -> pb.TaskSpec:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        deps: dict[str, None] = {}
        args, kwargs = self._refs_for_futures((args, kwargs), deps)
        payload = serialize.dump_call(fn, args, kwargs, function)
        if key is None:
            # Unique across clients by the random prefix (as a uuid4 would
            # be), and cheaper: a map of 20,000 spent 6% of its time in uuid4.
            name = getattr(fn, "__name__", type(fn).__name__)
            key = f"{name}-{self._key_prefix}{next(self._key_numbers):016x}"
        return pb.TaskSpec(
            key=key,
            payload=payload,
            resources=options.resources,
            dependencies=list(deps),
            priority=options.priority,
            retries=options.retries,
            workers=options.workers,
            allow_other_workers=options.allow_other_workers,
        )

    def _refs_for_futures(self, obj: Any, deps: dict[str, None]) -> Any:
        if isinstance(obj, Future):
            if obj.client is not self:
                raise ValueError(f"future {obj.key!r} belongs to another client")
            deps[obj.key] = None
            return serialize.InputRef(obj.key)
        if type(obj) in (list, tuple, set, frozenset):
            return type(obj)(self._refs_for_futures(x, deps) for x in obj)
        if type(obj) is dict:
            return {k: self._refs_for_futures(v, deps) for k, v in obj.items()}
        return obj

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        resources: Mapping[str, float | str] | None = None,
        key: str | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker that has ``resources`` free.

        ``workers`` (names or addresses) restricts where it may run; with
        ``allow_other_workers=True`` they are only preferred. Resources are
        never loosened either way.
        """
        options = self._options(resources, retries, priority, workers, allow_other_workers)
        spec = self._spec(fn, args, kwargs, key, options)
        future = Future(spec.key, self)
        self._submit_specs([spec])
        return _ready(future) if self.asynchronous else future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        resources: Mapping[str, float | str] | None = None,
        key: str | list[str] | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One task per element (zipped across ``iterables``), submitted as one batch."""
        options = self._options(resources, retries, priority, workers, allow_other_workers)
        argsets = list(zip(*iterables, strict=False))
        keys: list[str | None]
        if isinstance(key, list):
            if len(key) != len(argsets):
                raise ValueError(f"map() got {len(key)} keys for {len(argsets)} tasks")
            keys = list(key)
        elif isinstance(key, str):
            keys = [f"{key}-{i}" for i in range(len(argsets))]
        else:
            keys = [None] * len(argsets)
        # The function is pickled once for all the tasks (cloudpickle takes
        # ~20 us per call for a function defined in __main__).
        function = serialize.dump_function(fn) if callable(fn) and argsets else None
        futures: list[Future] = []
        # Handed over MAP_BATCH at a time: the first tasks are on their way
        # (and running) while the rest are still being pickled. A map of
        # 20,000 took 165 ms to build before its first task was sent.
        for start in range(0, len(argsets), MAP_BATCH):
            specs = [
                self._spec(fn, tuple(a), kwargs, k, options, function)
                for a, k in zip(
                    argsets[start : start + MAP_BATCH], keys[start : start + MAP_BATCH], strict=True
                )
            ]
            futures.extend(Future(spec.key, self) for spec in specs)
            self._submit_specs(specs)
        return _ready(futures) if self.asynchronous else futures

    def gather(self, futures: Any) -> Any:
        """Results of futures, in the same nesting (lists, tuples, dicts)."""
        return self._maybe_async(self._gather(futures))

    async def _gather(self, obj: Any) -> Any:
        if isinstance(obj, Future):
            return await self.core.result(obj.key)
        if type(obj) in (list, tuple):
            return type(obj)(await self._gather_all(list(obj)))
        if type(obj) is dict:
            values = await self._gather_all(list(obj.values()))
            return dict(zip(obj.keys(), values, strict=True))
        return obj

    async def _gather_all(self, items: list[Any]) -> list[Any]:
        """Results of ``items`` in order. All are awaited one after another
        first (no task per future: a map of 20,000 spent a fifth of the
        client's time on them); what is then at hand (small results came
        inline) is unpickled here, the rest fetched side by side."""
        core = self.core
        for item in items:
            if isinstance(item, Future):
                await core.wait(item.key)
        values: list[Any] = [NOT_AT_HAND] * len(items)
        later: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, Future):
                values[i] = core.result_at_hand(item.key)
                if values[i] is NOT_AT_HAND:
                    later.append(i)
            elif type(item) in (list, tuple, dict):
                later.append(i)
            else:
                values[i] = item
        if later:
            fetched = await asyncio.gather(*(self._gather(items[i]) for i in later))
            for i, value in zip(later, fetched, strict=True):
                values[i] = value
        return values

    def cancel(self, futures: Future | Iterable[Future]) -> Any:
        items = [futures] if isinstance(futures, Future) else list(futures)
        keys = [f.key for f in items]

        async def run() -> None:
            self.core.cancel(keys)

        return self._maybe_async(run())

    def set_resources(self, worker: str, resources: Mapping[str, float | str]) -> Any:
        """Change what ``worker`` (an address or a name) declares, while it runs.

        Raising starts waiting tasks at once; lowering below what running tasks
        hold lets them finish and starts nothing new that needs more than fits.
        Returns the worker's entry as in ``scheduler_info()["workers"]``.
        """
        amounts = check_resources(resources)

        async def run() -> dict[str, Any]:
            reply = await self.core.unary(
                "SetWorkerResources",
                pb.SetWorkerResourcesRequest(worker=worker, resources=amounts),
            )
            return worker_info(reply.worker)

        return self._maybe_async(run())

    def explain(self, future: Future | str) -> Any:
        """One sentence on why a task is not running (or what it is doing)."""
        key = future.key if isinstance(future, Future) else future

        async def run() -> str:
            reply = await self.core.unary("ExplainTask", pb.ExplainTaskRequest(key=key))
            return str(reply.explanation)

        return self._maybe_async(run())

    def scheduler_info(self) -> Any:
        """Workers with their resources and what is in use now."""

        async def run() -> dict[str, Any]:
            return cluster_info(await self.core.cluster_state())

        return self._maybe_async(run())

    def __repr__(self) -> str:
        return f"<Client scheduler={self.address!r}>"

    # ------------------------------------------------- for Future's methods

    def _key_status(self, key: str) -> str:
        core = self._core
        state = core.keys.get(key) if core is not None else None
        return state.status if state is not None else "lost"

    def _result(self, key: str, timeout: float | None) -> Any:
        return self._maybe_async(self.core.result(key), timeout)

    def _exception(self, key: str, timeout: float | None) -> Any:
        async def run() -> BaseException | None:
            try:
                await self.core.result(key)
            except Exception as exc:
                return exc
            return None

        return self._maybe_async(run(), timeout)


async def _cancel_others() -> None:
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


async def _ready(value: T) -> T:
    return value


__all__ = ["Client", "cluster_info"]
