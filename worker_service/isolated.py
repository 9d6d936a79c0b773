"""Running a task in a child process that sees only its GPUs (``isolate=True``).

A task that asks for it runs in a child process started with
``CUDA_VISIBLE_DEVICES`` set to the devices it holds, so that a library
initialising CUDA in it finds those devices and no others. The children are
kept in a small pool per device set (a spawn-context ``ProcessPoolExecutor``)
and reused from task to task: starting one costs a fresh interpreter and the
imports of this package (about half a second), paid once per pool.

Only bytes cross to the child (the payload, each input's wire form, the
context's fields) and only bytes or an :class:`ErrorInfo` come back; a value
of :data:`SHM_MIN_BYTES` or more goes through a shared-memory segment
instead, named in the message (written once, read once: NumPy arrays are
mapped, not copied); the child
calls :func:`execute`, so the task context, the task's errors and "the result
cannot be pickled" are exactly as in a task thread, and so are retries and
cancellation (the worker decides those from the outcome, as for a thread).
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import EllipsisType
from typing import Any

from apportion_common import serialize, shm
from apportion_common.serialize import ErrorInfo, Frames
from apportion_common.task_context import TaskContext

from .execute import Outcome, execute

#: Values at least this large go to and from the child in shared memory.
SHM_MIN_BYTES = 1024 * 1024
#: A child's status when it ends because the worker process is gone.
PARENT_DIED_EXIT_CODE = 70
#: How long shutdown lets children leave by themselves before ending them: an
#: idle one leaves within milliseconds, one still starting up within a second.
IDLE_EXIT_S = 2.0
#: How long shutdown waits for terminated children before it kills them.
TERMINATE_GRACE_S = 2.0
#: How long a broken pool's error waits for its children's exit codes.
EXIT_CODE_WAIT_S = 1.0


class IsolatedProcessDied(RuntimeError):
    """The child process running an isolated task died under it (``os._exit``,
    a segfault, the OOM killer), or was stopped with the worker."""


@dataclass(slots=True)
class _Pool:
    """The children for one device set."""

    #: CUDA_VISIBLE_DEVICES in the children; None: as in this process
    visible: str | None
    executor: ProcessPoolExecutor
    #: the executor's own pid -> process map, kept because its shutdown drops it
    processes: Mapping[int, BaseProcess]
    stopped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class IsolatedRunner:
    """Child-process pools, one per device set, each running at most
    ``max_per_pool`` tasks at once.

    A child that dies takes its whole pool with it (that is what
    ``ProcessPoolExecutor`` does): every task running in that pool at the
    moment fails with :class:`IsolatedProcessDied`, not just the one whose
    child died, and the next task on that device set gets a fresh pool. It is
    a task error like any other (retried where the task asked for retries).
    """

    def __init__(self, max_per_pool: int) -> None:
        if max_per_pool < 1:
            raise ValueError(f"max_per_pool must be at least 1, not {max_per_pool}")
        self.max_per_pool = max_per_pool
        self._pools: dict[str | None, _Pool] = {}
        self._lock = threading.Lock()
        self._closed = False

    def run(
        self,
        key: str,
        payload: bytes,
        inputs: Mapping[str, Frames],
        context: TaskContext,
        visible: str | EllipsisType | None = ...,
    ) -> Outcome:
        """Run one task in a child of the pool for its devices; never raises.

        Blocks the calling thread (a task thread) until the task ends.
        ``visible``: ``CUDA_VISIBLE_DEVICES`` in the child; by default
        ``context.gpus`` joined by commas (``""``: no GPU); None leaves it as
        this process has it.
        """
        if isinstance(visible, EllipsisType):
            visible = ",".join(context.gpus)
        began = time.perf_counter()
        made: list[shm.Segment] = []  # inputs handed over in shared memory
        try:
            try:
                # Bytes (or a segment's name) only: nothing of this process's
                # (a Frames' memoryviews) has to pickle on the way, and the
                # payload stays cloudpickle's.
                wire = {k: _handed(v, made) for k, v in inputs.items()}
                fields = dataclasses.asdict(context)
                pool, future = self._submit(visible, key, payload, wire, fields)
            except Exception as exc:  # shut down (or something as unexpected)
                return Outcome(self._failed(key, exc), time.perf_counter() - began)
            try:
                duration, result = future.result()
            except BrokenProcessPool:
                return Outcome(self._died(key, pool), time.perf_counter() - began)
            except Exception as exc:  # cancelled by shutdown, or the plumbing failed
                return Outcome(self._failed(key, exc), time.perf_counter() - began)
        finally:
            for segment in made:
                segment.remove()  # the child has read it, or never will
        if isinstance(result, ErrorInfo):
            return Outcome(result, duration)
        try:
            return Outcome(_taken(result, remove=True), duration)
        except shm.SharedMemoryUnavailable as exc:
            return Outcome(serialize.error_info(exc), duration)

    def shutdown(self) -> None:
        """Stop every pool now, without waiting for running tasks (they fail
        with :class:`IsolatedProcessDied`), leaving no child behind."""
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            _stop(pool)
        if pools:
            # The executors' queues sit in reference cycles: collected now,
            # their semaphores are released before the worker exits (which
            # may be by os._exit), not reported leaked by the resource tracker.
            del pools
            gc.collect()

    def _submit(self, visible: str | None, *args: Any) -> tuple[_Pool, Future[Any]]:
        for attempt in range(2):
            pool = self._pool(visible)
            try:
                return pool, pool.executor.submit(_run_in_child, *args)
            except RuntimeError:  # BrokenProcessPool is one
                if attempt:
                    raise
                # Broken (and so maybe stopped) by another task since we took
                # it: this task has not started, so a fresh pool takes it.
                self._discard(pool)
        raise AssertionError("unreachable")

    def _pool(self, visible: str | None) -> _Pool:
        with self._lock:
            if self._closed:
                raise RuntimeError("the isolated runner is shut down")
            pool = self._pools.get(visible)
            if pool is None:
                executor = ProcessPoolExecutor(
                    max_workers=self.max_per_pool,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_initialize,
                    initargs=(visible,),
                )
                # A private attribute, but the only handle on the children:
                # the same dict object lives on after shutdown() drops it,
                # and no child is added to it after shutdown.
                pool = _Pool(visible, executor, executor._processes)
                self._pools[visible] = pool
            return pool

    def _discard(self, pool: _Pool) -> None:
        with self._lock:
            if self._pools.get(pool.visible) is pool:
                del self._pools[pool.visible]
        _stop(pool)

    def _failed(self, key: str, exc: Exception) -> ErrorInfo:
        if self._closed:
            return _stopped(key)
        return serialize.error_info(exc)

    def _died(self, key: str, pool: _Pool) -> ErrorInfo:
        """The error for a task whose pool broke; the pool is discarded."""
        self._discard(pool)
        if self._closed:
            return _stopped(key)
        # The others end with SIGTERM (the executor's terminate() and ours).
        codes = [code for code in _exit_codes(pool) if code is not None and code != -signal.SIGTERM]
        how = ", ".join(_describe(c) for c in codes) or "exit code unknown"
        devices = "as in the worker" if pool.visible is None else repr(pool.visible)
        return serialize.error_info(
            IsolatedProcessDied(
                f"the child process running task {key!r} "
                f"(CUDA_VISIBLE_DEVICES={devices}) died: {how}"
            )
        )


def _stopped(key: str) -> ErrorInfo:
    return serialize.error_info(
        IsolatedProcessDied(f"task {key!r} was stopped: the worker is shutting down")
    )


def _stop(pool: _Pool) -> None:
    """Shut ``pool`` down now and end its children: a running task in one
    would otherwise keep it alive after the worker is gone."""
    with pool.lock:  # two shutdown() calls at once can trip over each other
        if not pool.stopped:
            pool.stopped = True
            pool.executor.shutdown(wait=False, cancel_futures=True)
    children = list(pool.processes.values())  # one C-level copy: the manager thread pops
    # Idle children leave on the executor's own word within milliseconds;
    # ending them by signal instead leaves multiprocessing's semaphores to
    # its resource tracker, which warns of "leaked semaphore objects".
    deadline = time.monotonic() + IDLE_EXIT_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.exitcode is None:
            child.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.exitcode is None:  # SIGTERM caught or ignored by the task
            child.kill()
            child.join(1.0)
    # The children are gone: let the executor's manager thread end and close
    # its queues, so their semaphores are released here and not reported
    # leaked by multiprocessing's resource tracker when the worker exits.
    pool.executor.shutdown(wait=True)


def _exit_codes(pool: _Pool) -> list[int | None]:
    """The exit codes of ``pool``'s children, once they are all known.

    The executor's manager thread reaps the children too: a child it has
    reaped but not yet recorded reads as still running (None) for a moment.
    """
    children = list(pool.processes.values())
    deadline = time.monotonic() + EXIT_CODE_WAIT_S
    while any(c.exitcode is None for c in children) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [c.exitcode for c in children]


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


# In the child.


def _initialize(visible: str | None) -> None:
    # Before any task code: the child is a fresh (spawned, not forked)
    # interpreter, so nothing in it can have initialised CUDA yet, and CUDA
    # reads CUDA_VISIBLE_DEVICES only when it initialises.
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    # Ctrl-C reaches the whole process group: the worker decides when its
    # children stop (a handler, not SIG_IGN, so a task's own subprocesses
    # still get the default).
    signal.signal(signal.SIGINT, _ignore)
    parent = multiprocessing.parent_process()
    if parent is not None:
        watch = threading.Thread(target=_exit_with, args=(parent,), name="parent-watch")
        watch.daemon = True
        watch.start()


def _ignore(signum: int, frame: object) -> None:
    pass


def _exit_with(parent: BaseProcess) -> None:
    # A worker killed outright (SIGKILL, the OOM killer) runs no shutdown():
    # without this its children would live on, idle, holding their GPU memory.
    wait([parent.sentinel])
    os._exit(PARENT_DIED_EXIT_CODE)


def _run_in_child(
    key: str, payload: bytes, inputs: dict[str, bytes | _InSegment], fields: dict[str, Any]
) -> tuple[float, bytes | _InSegment | ErrorInfo]:
    """One task, in the child: its duration and its result's wire form, or
    the segment holding it (a large one), or its error."""
    values = {k: _taken(v, remove=False) for k, v in inputs.items()}  # the parent removes
    outcome = execute(key, payload, values, TaskContext(**fields))
    result = outcome.result
    if isinstance(result, ErrorInfo):
        return outcome.duration, result  # it pickles: strings, bytes and an enum
    # Its segment is the parent's to remove, once read.
    return outcome.duration, _handed(result)


# Both ways.


@dataclass(frozen=True, slots=True)
class _InSegment:
    """A value handed over in a shared-memory segment (see :mod:`apportion_common.shm`)."""

    name: str
    nbytes: int


def _handed(frames: Frames, made: list[shm.Segment] | None = None) -> bytes | _InSegment:
    """``frames`` as the other side takes it: a large value in a segment
    (one copy each way, where the pipe costs four: join, send, receive,
    parse), added to ``made``; a small one, or with no room in /dev/shm, as bytes."""
    if frames.nbytes >= SHM_MIN_BYTES and shm.available():
        try:
            segment = shm.Segment.write(frames)
        except shm.SharedMemoryUnavailable:
            pass
        else:
            if made is not None:
                made.append(segment)
            return _InSegment(segment.name, segment.nbytes)
    return b"".join(frames.segments())


def _taken(value: bytes | _InSegment, *, remove: bool) -> Frames:
    """What :func:`_handed` gave, as Frames (arrays over the segment, uncopied)."""
    if isinstance(value, _InSegment):
        return shm.read(value.name, value.nbytes, remove=remove)
    return Frames.parse([value])
