"""Waiting on many futures, with Dask's names and meanings: :func:`wait`,
:class:`as_completed`, :func:`fire_and_forget`.

Each works on the futures of a synchronous client (blocking) and of an
asynchronous one (``await wait(...)``, ``async for f in as_completed(...)``).
Nothing here polls: the client calls back as each task ends (one callback per
future, no task or thread per future).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Literal, NamedTuple

from .future import Future, owner_of

ReturnWhen = Literal["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"]
RETURN_WHEN: tuple[ReturnWhen, ...] = ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION")
#: The statuses that end a FIRST_EXCEPTION wait.
_FAILED = frozenset({"error", "lost"})


class DoneAndNotDone(NamedTuple):
    """What :func:`wait` returns (as ``concurrent.futures.wait`` does)."""

    done: set[Future[Any]]
    not_done: set[Future[Any]]


def futures_of(fs: Future[Any] | Iterable[Future[Any]]) -> list[Future[Any]]:
    futures = [fs] if isinstance(fs, Future) else list(fs)
    for f in futures:
        if not isinstance(f, Future):
            raise TypeError(f"expected Futures, got a {type(f).__name__}: {f!r}")
    return futures


def one_client(futures: list[Future[Any]], what: str) -> Any:
    """The one Client the futures belong to (None for no futures)."""
    clients = {id(f.client): f.client for f in futures}
    if len(clients) > 1:
        raise ValueError(
            f"{what}() takes the futures of one client; these come from {len(clients)}"
        )
    return next(iter(clients.values()), None)


def wait(
    fs: Future[Any] | Iterable[Future[Any]],
    timeout: float | None = None,
    return_when: ReturnWhen = "ALL_COMPLETED",
) -> Any:
    """Wait until the futures are done (``ALL_COMPLETED``), one is
    (``FIRST_COMPLETED``), or one raised (``FIRST_EXCEPTION``, else all done).

    Returns ``(done, not_done)`` sets; raises ``TimeoutError`` if ``timeout``
    seconds pass first. With an asynchronous client, a coroutine.
    """
    if return_when not in RETURN_WHEN:
        raise ValueError(
            f"return_when must be one of {', '.join(RETURN_WHEN)}, not {return_when!r}"
        )
    futures = futures_of(fs)
    client = one_client(futures, "wait")
    if client is None:
        return DoneAndNotDone(set(), set())
    owner = owner_of(futures[0])
    keys = [f.key for f in futures]
    by_key = {f.key: f for f in futures}

    def until(done: set[str]) -> bool:
        if return_when == "FIRST_COMPLETED":
            return bool(done)
        if return_when == "FIRST_EXCEPTION":
            return any(by_key[k].status in _FAILED for k in done)
        return False  # ALL_COMPLETED: wait_for returns once all are done

    def split(done_keys: set[str]) -> DoneAndNotDone:
        done = {f for f in futures if f.key in done_keys}
        return DoneAndNotDone(done, set(futures) - done)

    waiting = owner.wait_keys(keys, until, timeout)
    if client.asynchronous:

        async def in_loop() -> DoneAndNotDone:
            return split(await waiting)

        return in_loop()
    return split(waiting)


def fire_and_forget(fs: Future[Any] | Iterable[Future[Any]]) -> None:
    """Let the tasks run to the end although no client holds them, even after
    their client closes (their results are then released)."""
    futures = futures_of(fs)
    by_owner: dict[int, tuple[Any, list[str]]] = {}
    for f in futures:
        owner = owner_of(f)
        by_owner.setdefault(id(owner), (owner, []))[1].append(f.key)
    for owner, keys in by_owner.values():
        owner.fire_and_forget(keys)


class as_completed:
    """Iterate over futures in the order they complete.

    ``with_results=True`` yields ``(future, result)``; with
    ``raise_errors=False`` a failed future yields ``(future, exception)``
    instead of raising. ``add``/``update`` add futures while iterating;
    ``count()`` is how many are still to come. With an asynchronous client,
    ``async for``.
    """

    def __init__(
        self,
        futures: Iterable[Future[Any]] | None = None,
        with_results: bool = False,
        raise_errors: bool = True,
    ) -> None:
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._lock = threading.Lock()
        #: futures added and not yet yielded (a future added twice comes twice)
        self._to_come = 0
        self._ready: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        self._async_ready: asyncio.Queue[Future[Any]] | None = None
        self._asynchronous: bool | None = None
        self.update(futures or ())

    def add(self, future: Future[Any]) -> None:
        """Yield ``future`` too, once it is done."""
        (future,) = futures_of(future)
        asynchronous = bool(future.client.asynchronous)
        with self._lock:
            if self._asynchronous is None:
                self._asynchronous = asynchronous
            elif self._asynchronous != asynchronous:
                raise ValueError(
                    "as_completed() takes futures of sync or of async clients, not both"
                )
            self._to_come += 1
        if asynchronous and self._async_ready is None:
            self._async_ready = asyncio.Queue()
        owner_of(future).add_done_callback(future.key, lambda: self._done(future))

    def update(self, futures: Iterable[Future[Any]]) -> None:
        for future in futures:
            self.add(future)

    def _done(self, future: Future[Any]) -> None:
        # Async clients call back on their loop; sync ones from a thread.
        if self._async_ready is not None:
            self._async_ready.put_nowait(future)
        else:
            self._ready.put(future)

    def count(self) -> int:
        """Futures added and not yet yielded."""
        return self._to_come

    def is_empty(self) -> bool:
        return self._to_come == 0

    def has_ready(self) -> bool:
        """A future is done and waits to be yielded."""
        ready = self._async_ready if self._async_ready is not None else self._ready
        return not ready.empty()

    # ------------------------------------------------------------ sync

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._asynchronous:
            raise TypeError("as_completed() of an asynchronous client's futures: use 'async for'")
        with self._lock:
            if self._to_come == 0:
                raise StopIteration
        future = self._ready.get()
        with self._lock:
            self._to_come -= 1
        if not self.with_results:
            return future
        try:
            return future, future.result()
        except Exception as exc:
            if self.raise_errors:
                raise
            return future, exc

    # ----------------------------------------------------------- async

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._asynchronous is False:
            raise TypeError("as_completed() of a synchronous client's futures: use 'for'")
        if self._to_come == 0 or self._async_ready is None:
            raise StopAsyncIteration
        future = await self._async_ready.get()
        self._to_come -= 1
        if not self.with_results:
            return future
        try:
            return future, await future.result()
        except Exception as exc:
            if self.raise_errors:
                raise
            return future, exc
