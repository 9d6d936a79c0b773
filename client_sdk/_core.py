"""The client's core: the state of every key, and the one stream that keeps it.

:class:`ClientCore` runs on one asyncio loop (the caller's for an
asynchronous Client, a thread's of its own for a synchronous one; see
:mod:`client_sdk._bridge`). It owns

- the state of each key this client submitted (:class:`KeyState`: status,
  where the result lives, or its error), changed only by the scheduler's
  ``TaskUpdate`` messages, and by ``cancel`` at once;
- the stream: submits, cancels and releases are queued and written as
  batches by one writer task, runs of the same kind merged into one message;
- reconnecting with backoff when the stream breaks, naming the keys it holds
  and submitting again the tasks still pending;
- results: waiting for a key, taking a small result sent inline, else
  fetching it from a worker that holds it; ``gather`` of many.

It reaches the network only through a :class:`~client_sdk._transport.Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from apportion_common import serialize
from apportion_common.status import ErrorKind
from apportion_common.status_pb import ERROR_KIND_FROM_PB, TASK_STATUS_FROM_PB
from apportion_common.transfer import ResultUnavailable
from protos import apportion_pb2 as pb

from ._errors import rebuild_exception
from ._grpc_errors import StreamBroken
from ._released import ReleasedSpecs
from ._transport import SchedulerStream, Transport
from .exceptions import FutureCancelledError
from .future import Future

log = logging.getLogger("client_sdk")

CONNECT_TIMEOUT_S = 10.0
#: How long a client whose stream broke keeps trying to reach the scheduler
#: again before its pending futures fail with SchedulerConnectionError.
RECONNECT_TIMEOUT_S = 30.0
MAX_RECONNECT_BACKOFF_S = 2.0
#: Tasks per message when a reconnecting client submits its pending ones again.
RESUBMIT_BATCH = 5_000
#: While fetching a result, how often to check that its holder still has it.
FETCH_RECHECK_S = 0.2
#: When every holder of a result failed and the scheduler says nothing new,
#: the fetch is tried again after this long, doubling up to FETCH_RETRY_MAX_S.
FETCH_RETRY_S = 0.2
FETCH_RETRY_MAX_S = 5.0
#: The same reason for waiting is logged at most once in this many seconds.
WAITING_WARNING_INTERVAL_S = 10.0
#: How long closing waits for the scheduler to acknowledge the goodbye.
GOODBYE_TIMEOUT_S = 2.0


#: The statuses a task leaves "pending" for (Future.done() is True in them).
DONE = frozenset({"finished", "error", "cancelled", "lost"})


@dataclass(slots=True)
class KeyState:
    #: "pending", then one of DONE ("finished" may turn "pending" again when
    #: its result was lost and is being made again)
    status: str = "pending"
    addresses: tuple[str, ...] = ()
    #: the result's size as its holder reported it (a large one is fetched striped)
    nbytes: int = 0
    error: serialize.ErrorInfo | None = None
    waiting_reason: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: how many updates the scheduler sent: news, even when it repeats a state
    updates: int = 0
    #: a small result sent along with "finished": no fetch needed
    inline_result: bytes = b""
    #: kept until the task finishes, to submit again should the scheduler
    #: restart without having it (a reconnect loses nothing)
    spec: pb.TaskSpec | None = None
    #: called (on the loop, with the key) once it is done; see when_done
    on_done: list[Callable[[str], object]] = field(default_factory=list)


class ClientCore:
    """The client's state and its stream; every method runs on one loop."""

    def __init__(
        self, transport: Transport, reconnect_timeout: float = RECONNECT_TIMEOUT_S
    ) -> None:
        self.transport = transport
        self.address = transport.address
        self.reconnect_timeout = reconnect_timeout
        self.client_id = f"client-{uuid.uuid4().hex}"
        self.keys: dict[str, KeyState] = {}
        #: specs of tasks released here before they finished (see _released)
        self._released = ReleasedSpecs()
        self._outgoing: list[pb.ClientToScheduler] = []
        self._wake = asyncio.Event()
        self._stream: SchedulerStream | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.lost: str | None = None
        self._reconnect_deadline: float | None = None
        #: why tasks wait (without their keys) -> when that was last logged
        self._warned: dict[str, float] = {}

    async def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        try:
            await self.transport.connect(timeout)
        except BaseException:
            await self.transport.close()
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
        self._stream = stream = self.transport.open_stream()
        resume = [k for k, st in self.keys.items() if st.spec is None and st.status != "cancelled"]
        await stream.write(
            pb.ClientToScheduler(hello=pb.ClientHello(client_id=self.client_id, resume_keys=resume))
        )
        pending = [st.spec for st in self.keys.values() if st.spec is not None]
        # Inputs this client released first (each before what needs it); it
        # does not want them, so it releases them again at once: the
        # scheduler keeps them while a pending task needs them.
        inputs = self._released.needed_by(pending)
        again = [*inputs, *pending]
        for start in range(0, len(again), RESUBMIT_BATCH):
            batch = again[start : start + RESUBMIT_BATCH]
            await stream.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=batch)))
        if inputs:
            keys = [spec.key for spec in inputs]
            await stream.write(pb.ClientToScheduler(release=pb.KeyList(keys=keys)))

    async def _reconnect(self) -> bool:
        """Reach the scheduler again, with backoff, for RECONNECT_TIMEOUT_S."""
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
            if not await self.transport.wait_ready(max(0.1, deadline - time.monotonic())):
                log.debug("reconnecting to %s: not reachable yet", self.address)
                continue
            try:
                await self._open_stream()
            except StreamBroken as exc:
                log.debug("reconnecting to %s: %s", self.address, exc)
                continue
            return True
        return False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader, writers = (self._tasks[0], self._tasks[1:]) if self._tasks else (None, [])
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        stream = self._stream
        if stream is not None and self.lost is None:
            # Say goodbye: send what is still queued, then end our side. The
            # scheduler then drops this client's tasks at once, instead of
            # keeping them through the grace period it gives a broken stream.
            with contextlib.suppress(StreamBroken, TimeoutError):
                batch, self._outgoing = self._outgoing, []
                batch.append(pb.ClientToScheduler(goodbye=pb.ClientGoodbye()))
                for msg in _coalesce(batch):
                    await asyncio.wait_for(stream.write(msg), GOODBYE_TIMEOUT_S)
                await asyncio.wait_for(stream.done_writing(), GOODBYE_TIMEOUT_S)
                if reader is not None:
                    # The scheduler ends the stream once it has read our end.
                    await asyncio.wait_for(reader, GOODBYE_TIMEOUT_S)
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if stream is not None:
            stream.cancel()
        await self.transport.close()

    # ------------------------------------------------------------ sending

    def _send(self, msg: pb.ClientToScheduler) -> None:
        self._outgoing.append(msg)
        self._wake.set()

    async def _write_batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outgoing = self._outgoing, []
            stream = self._stream  # the current one: after a reconnect, the new one
            assert stream is not None
            try:
                for msg in _coalesce(batch):
                    await stream.write(msg)
            except StreamBroken:
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
                self.keys[spec.key] = KeyState(spec=spec)
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
                self._settle(key, state)
        self._send(pb.ClientToScheduler(cancel=pb.KeyList(keys=keys)))

    def fire_and_forget(self, keys: list[str]) -> None:
        """The scheduler keeps these tasks until they end, whatever this
        client does (as if another client wanted each until then)."""
        if not self.closed and self.lost is None:
            self._send(pb.ClientToScheduler(fire_and_forget=pb.KeyList(keys=keys)))

    def release(self, keys: list[str]) -> None:
        for key in keys:
            state = self.keys.pop(key, None)
            if state is not None and state.spec is not None:
                self._released.keep(state.spec)
        if self._released.piling_up(len(self.keys)):  # prune to what pending tasks need
            self._released.needed_by([st.spec for st in self.keys.values() if st.spec is not None])
        if not self.closed and self.lost is None:
            self._send(pb.ClientToScheduler(release=pb.KeyList(keys=keys)))

    # ---------------------------------------------------------- receiving

    async def _read_updates(self) -> None:
        while True:
            stream = self._stream
            assert stream is not None
            reason = "the scheduler closed the stream"
            refused = False
            try:
                while True:
                    msg = await stream.read()
                    if msg is None:
                        break
                    self._reconnect_deadline = None  # this stream works
                    for update in msg.updates:
                        self._apply(update)
            except StreamBroken as exc:
                reason, refused = str(exc), exc.refused
            except asyncio.CancelledError:
                return
            if self.closed:
                return
            # Refused credentials would be refused again: no reconnecting.
            if not refused:
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
        self._settle(key, state)

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
        if (
            status == "error"
            and update.error.kind == pb.ERROR_KIND_SCHEDULER_CONNECTION
            and state.status in ("finished", "error")
        ):
            # The scheduler forgot a task this client had seen end (it
            # restarted without a state directory): a result cannot be made
            # again without its spec, so it is lost; an error stays what it was.
            if state.status == "finished":
                state.status = "lost"
                state.error = serialize.ErrorInfo(
                    "SchedulerConnectionError",
                    f"the result of task {update.key!r} is lost: {update.error.message}",
                    kind=ErrorKind.SCHEDULER_CONNECTION,
                )
                state.addresses, state.inline_result = (), b""
            self._settle(update.key, state)
            return
        state.status = status
        state.updates += 1
        if status == "pending":
            state.changed.clear()
            state.inline_result = b""  # lost, being made again: wait for it
            if update.waiting_reason and update.waiting_reason != state.waiting_reason:
                self._warn_waiting(update.key, update.waiting_reason)
            state.waiting_reason = update.waiting_reason
            return
        state.spec = None  # finished or failed for good: never submitted again
        state.addresses = tuple(update.addresses)
        state.nbytes = update.nbytes
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
        self._settle(update.key, state)

    def _settle(self, key: str, state: KeyState) -> None:
        """``key`` is done: wake whoever waits, and call its done-callbacks once."""
        state.changed.set()
        if state.on_done:
            callbacks, state.on_done = state.on_done, []
            for callback in callbacks:
                _call_back(callback, key)

    def when_done(self, key: str, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(key)`` on the loop once ``key`` is done (at once, if
        it is already); returns a function that forgets the callback."""
        state = self.keys.get(key)
        if state is None or state.status in DONE:
            # At once, not soon: a key that ends after this call must not be
            # called back first (as_completed yields in the order keys end).
            _call_back(callback, key)
            return _nothing
        state.on_done.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                state.on_done.remove(callback)

        return forget

    def is_done(self, key: str) -> bool:
        state = self.keys.get(key)
        return state is None or state.status in DONE

    async def wait_for(self, keys: list[str], until: Callable[[set[str]], bool]) -> set[str]:
        """Wait until ``until(done)`` holds for the set of ``keys`` done so
        far (checked as each one ends); return that set. One callback per key
        and one event: no task per key."""
        done = {key for key in keys if self.is_done(key)}
        if until(done) or len(done) == len(set(keys)):
            return done
        event = asyncio.Event()

        def one_done(key: str) -> None:
            done.add(key)
            if until(done) or len(done) == len(set(keys)):
                event.set()

        forgets = [self.when_done(key, one_done) for key in set(keys) - done]
        try:
            await event.wait()
        finally:
            for forget in forgets:
                forget()
        return done

    def _warn_waiting(self, key: str, reason: str) -> None:
        """Log why a task waits: once per reason and interval, not once per
        task (a large map that no worker fits would flood the log)."""
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

    async def wait(self, key: str) -> KeyState:
        state = self.keys.get(key)
        if state is None:
            raise KeyError(f"task {key!r} was released by this client")
        await state.changed.wait()
        return state

    async def result(self, key: str) -> Any:
        retry_after = FETCH_RETRY_S
        while True:
            state = await self.wait(key)
            _raise_if_failed(key, state)
            if state.inline_result:
                return serialize.loads(state.inline_result)
            seen = state.updates
            for address in state.addresses:
                try:
                    data = await self._fetch_while_current(state, address, key, seen)
                except ResultUnavailable as exc:
                    log.debug("result of %s: %s", key, exc)
                    continue
                if data is None:
                    break  # the scheduler moved the result on: follow it
                return serialize.loads(data)
            if state.updates != seen:
                continue  # news came while fetching (even the same holders again)
            # Every holder failed and the scheduler said nothing new: one it
            # still counts on may be briefly unreachable (frozen, restarting).
            # Try again after a pause, or at the next news (a lost holder's
            # result is made again: pending, then finished elsewhere).
            state.changed.clear()
            try:
                await asyncio.wait_for(state.changed.wait(), retry_after)
            except TimeoutError:
                if state.updates == seen:
                    state.changed.set()
            retry_after = min(retry_after * 2, FETCH_RETRY_MAX_S)

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
        self, state: KeyState, address: str, key: str, seen: int
    ) -> serialize.Frames | None:
        """Fetch ``key`` from ``address``, unless the scheduler says meanwhile
        that the result lives elsewhere now (its holder was declared lost):
        then None. A silent holder would otherwise keep us waiting until the
        connection's keepalive gives up, long after the recompute."""
        fetch = asyncio.ensure_future(self.transport.fetch(address, key, state.nbytes))
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=FETCH_RECHECK_S)
                if done:
                    return fetch.result()
                if state.status != "finished" or state.updates != seen:
                    return None
        finally:
            fetch.cancel()

    async def gather(self, obj: Any) -> Any:
        """Results of the futures in ``obj``, in the same nesting (lists,
        tuples, dicts); anything else in it as it is."""
        if isinstance(obj, Future):
            return await self.result(obj.key)
        if type(obj) in (list, tuple):
            return type(obj)(await self._gather_all(list(obj)))
        if type(obj) is dict:
            values = await self._gather_all(list(obj.values()))
            return dict(zip(obj.keys(), values, strict=True))
        return obj

    async def _gather_all(self, items: list[Any]) -> list[Any]:
        """Results of ``items`` in order. All are awaited one after another
        first (no task per future: making them was a large part of the client's
        time); what is then at hand (small results came inline) is
        unpickled here, the rest fetched side by side."""
        for item in items:
            if isinstance(item, Future):
                await self.wait(item.key)
        values: list[Any] = [NOT_AT_HAND] * len(items)
        later: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, Future):
                values[i] = self.result_at_hand(item.key)
                if values[i] is NOT_AT_HAND:
                    later.append(i)
            elif type(item) in (list, tuple, dict):
                later.append(i)
            else:
                values[i] = item
        if later:
            fetched = await asyncio.gather(*(self.gather(items[i]) for i in later))
            for i, value in zip(later, fetched, strict=True):
                values[i] = value
        return values


#: Message kinds whose runs merge into one message.
_MERGEABLE = frozenset({"submit", "cancel", "release", "fire_and_forget"})


def _coalesce(messages: list[pb.ClientToScheduler]) -> Iterable[pb.ClientToScheduler]:
    """Merge runs of the same kind into one message, keeping their order."""
    current: pb.ClientToScheduler | None = None
    current_kind = None
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if current is not None and kind == current_kind and kind in _MERGEABLE:
            if kind == "submit":
                current.submit.tasks.extend(msg.submit.tasks)
            elif kind == "cancel":
                current.cancel.keys.extend(msg.cancel.keys)
            elif kind == "release":
                current.release.keys.extend(msg.release.keys)
            else:
                current.fire_and_forget.keys.extend(msg.fire_and_forget.keys)
            continue
        if current is not None:
            yield current
        current, current_kind = msg, kind
    if current is not None:
        yield current


def _call_back(callback: Callable[[str], object], key: str) -> None:
    try:
        callback(key)
    except Exception:  # a caller's callback must not break the stream
        log.exception("a done-callback of task %r failed", key)


def _nothing() -> None:
    pass


def _raise_if_failed(key: str, state: KeyState) -> None:
    if state.status == "cancelled":
        raise FutureCancelledError(key)
    if state.status in ("error", "lost"):
        assert state.error is not None
        raise rebuild_exception(state.error)


#: result_at_hand(): the result needs a wait or a fetch.
NOT_AT_HAND = object()
