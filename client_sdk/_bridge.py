"""Between the caller and the client's loop: how work reaches the core.

The core (:mod:`client_sdk._core`) lives on one asyncio loop; a bridge hands
it work and brings back what comes out:

- :class:`SyncBridge`, for ``Client(address)``, runs that loop in a thread of
  its own and blocks on it, so the client can be used from several threads
  at once. Submits made one after another join one batch and one loop
  wake-up.
- :class:`AsyncBridge`, for ``Client(address, asynchronous=True)``, runs the
  core on the caller's loop and returns coroutines.

A bridge is also the :class:`~client_sdk.future.FutureOwner` of the client's
futures: it counts the futures of each key, and releases the keys whose last
future went, many in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, TypeVar

from protos import apportion_pb2 as pb

from ._core import ClientCore

log = logging.getLogger("client_sdk")

T = TypeVar("T")


class Bridge:
    """What the sync and async bridges share: the core, and the futures' keys.

    ``make_core`` makes the core when the client connects.
    """

    def __init__(self, make_core: Callable[[], ClientCore]) -> None:
        self._make_core = make_core
        self._core: ClientCore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refs: Counter[str] = Counter()
        self._refs_lock = threading.Lock()
        #: keys no future refers to any more, released together (drop)
        self._unreferenced: list[str] = []

    @property
    def core(self) -> ClientCore:
        if self._core is None:
            raise RuntimeError("the client is not connected (use 'async with' or 'await')")
        return self._core

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> Any:
        """Run ``coro`` on the client's loop: its value (sync), or a coroutine (async)."""
        raise NotImplementedError

    def submit(self, specs: list[pb.TaskSpec]) -> None:
        """Submit ``specs`` on the client's loop, in the order of all calls."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the client is closed")
        self._submit(loop, specs)

    def _submit(self, loop: asyncio.AbstractEventLoop, specs: list[pb.TaskSpec]) -> None:
        raise NotImplementedError

    def _call_soon(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the client's loop, soon, from the caller."""
        raise NotImplementedError

    # ------------------------------------------------ what a Future asks

    def hold(self, key: str) -> None:
        with self._refs_lock:
            self._refs[key] += 1

    def drop(self, key: str) -> None:
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
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._call_soon(loop, self._release_unreferenced)

    def _release_unreferenced(self) -> None:
        """On the loop: release every key whose last future went since the
        last call, in one message (not one loop wake-up and message each)."""
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

    def status(self, key: str) -> str:
        """``key``'s status as the core knows it. A key it does not know yet is
        one whose submit is still on its way to the loop: pending. (A key is
        released only once no Future holds it, so no live Future asks for one.)"""
        core = self._core
        state = core.keys.get(key) if core is not None else None
        return state.status if state is not None else "pending"

    def add_done_callback(self, key: str, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once ``key`` is done (at once if it is)."""
        self._call_soon_after_submits(lambda: self._when_done(key, callback))

    def _when_done(self, key: str, callback: Callable[[], object]) -> None:
        """(On the loop.) Register ``callback`` with the core."""
        raise NotImplementedError

    def _call_soon_after_submits(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop after every submit made before this call."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the client is closed")
        self._call_soon(loop, fn)

    def result(self, key: str, timeout: float | None) -> Any:
        return self.run(self.core.result(key), timeout)

    def exception(self, key: str, timeout: float | None) -> Any:
        async def run() -> BaseException | None:
            try:
                await self.core.result(key)
            except Exception as exc:
                return exc
            return None

        return self.run(run(), timeout)

    def cancel(self, keys: list[str]) -> Any:
        async def run() -> None:
            self.core.cancel(keys)

        return self.run(run())

    def awaitable_result(self, key: str) -> Coroutine[Any, Any, Any]:
        return self.core.result(key)

    def wait_keys(
        self, keys: list[str], until: Callable[[set[str]], bool], timeout: float | None
    ) -> Any:
        async def run() -> set[str]:
            return await self.core.wait_for(keys, until)

        return self.run(run(), timeout)

    def fire_and_forget(self, keys: list[str]) -> None:
        self._call_soon_after_submits(lambda: self.core.fire_and_forget(keys))


class SyncBridge(Bridge):
    """The core on a loop in a thread of its own; every call blocks on it.
    Done-callbacks run in a thread of their own (as Dask's), so a slow one
    holds up neither the caller nor the client's loop."""

    def __init__(self, make_core: Callable[[], ClientCore]) -> None:
        super().__init__(make_core)
        self._callbacks: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        #: the batch of submits not yet on the loop: (_scheduled when it
        #: began, its specs); see _submit
        self._submitting: tuple[int, list[pb.TaskSpec]] | None = None
        self._submit_lock = threading.Lock()
        #: how many other things were handed to the loop so far
        self._scheduled = 0

    def connect(self, timeout: float) -> None:
        self._start_loop_thread()
        self._core = self._make_core()
        try:
            self.run(self._core.connect(timeout))
        except BaseException:
            self._stop_loop_thread()
            raise

    def close(self) -> None:
        if self._loop is not None and self._core is not None and not self._core.closed:
            self.run(self._core.close())
        self._stop_loop_thread()
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)

    def _when_done(self, key: str, callback: Callable[[], object]) -> None:
        if self._callbacks is None:
            self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="apportion-callbacks")
        pool = self._callbacks
        self.core.when_done(key, lambda _: pool.submit(_call_logged, callback))

    @property
    def running(self) -> bool:
        """Whether the loop thread runs (until close)."""
        return self._loop is not None

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

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        assert self._loop is not None
        self._scheduled += 1  # submits after this one go in a batch of their own
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FuturesTimeout:
            if fut.done():
                raise  # the coroutine's own TimeoutError, with its own message
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout}s") from None

    def _submit(self, loop: asyncio.AbstractEventLoop, specs: list[pb.TaskSpec]) -> None:
        """From the caller's thread, submissions made one after another join
        one batch and one loop wake-up, until anything else is handed to the
        loop (which then comes after the batch, as it was called after it):
        each wake-up would take the GIL from the submitting thread."""
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

    def _call_soon(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
        self._scheduled += 1
        loop.call_soon_threadsafe(fn)


class AsyncBridge(Bridge):
    """The core on the caller's loop; calls return coroutines."""

    async def connect(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = self._make_core()
        await self._core.connect(timeout)

    async def close(self) -> None:
        if self._core is not None:
            await self._core.close()

    @property
    def connected(self) -> bool:
        return self._core is not None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> Any:
        return coro if timeout is None else asyncio.wait_for(coro, timeout)

    def _submit(self, loop: asyncio.AbstractEventLoop, specs: list[pb.TaskSpec]) -> None:
        self.core.submit(specs)

    def _call_soon(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
        loop.call_soon(fn)

    def _when_done(self, key: str, callback: Callable[[], object]) -> None:
        self.core.when_done(key, lambda _: _call_logged(callback))


def _call_logged(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:
        log.exception("a Future's done-callback failed")


async def _cancel_others() -> None:
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
