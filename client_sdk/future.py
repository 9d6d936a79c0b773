"""A handle on one task's result, in the style of ``concurrent.futures``.

A :class:`Future` holds its key, its Client, and its owner: the part of the
Client that counts the futures of each key and runs calls on the client's
loop, seen through the small :class:`FutureOwner` protocol (implemented by
:mod:`client_sdk._bridge`). This module imports nothing else of the SDK.

``Future[Literal[False]]`` comes from a synchronous Client (its methods
block), ``Future[Literal[True]]`` from an asynchronous one (its methods
return coroutines).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeVar, overload

#: Whether the Client that made it is asynchronous: Literal[True] or Literal[False].
IsAsync = TypeVar("IsAsync", bound=bool)


class FutureOwner(Protocol):
    """What a Future asks of the client that made it.

    ``result``, ``exception`` and ``cancel`` block in a synchronous client and
    return a coroutine in an asynchronous one.
    """

    def hold(self, key: str) -> None:
        """One more Future for ``key``: the scheduler keeps its result."""
        ...

    def drop(self, key: str) -> None:
        """One Future for ``key`` fewer; after the last, the key is released."""
        ...

    def status(self, key: str) -> str: ...

    def add_done_callback(self, key: str, callback: Callable[[], object]) -> None: ...

    def result(self, key: str, timeout: float | None) -> Any: ...

    def exception(self, key: str, timeout: float | None) -> Any: ...

    def cancel(self, keys: list[str]) -> Any: ...

    def awaitable_result(self, key: str) -> Coroutine[Any, Any, Any]:
        """The result, as a coroutine on the client's loop (``await future``)."""
        ...

    def wait_keys(
        self, keys: list[str], until: Callable[[set[str]], bool], timeout: float | None
    ) -> Any:
        """Until ``until(done keys)`` holds or all are done: the done keys
        (blocking, or a coroutine); TimeoutError after ``timeout`` seconds."""
        ...

    def fire_and_forget(self, keys: list[str]) -> None:
        """Have the scheduler run these to the end whatever becomes of this client."""
        ...


class Future(Generic[IsAsync]):
    """The result of task ``key``, computed somewhere on the cluster.

    Pass it to ``submit`` (also inside lists, tuples and dicts) to make a task
    that runs after it, on its result. The scheduler keeps the result while any
    Future for the key is alive in this client.
    """

    __slots__ = ("__weakref__", "_owner", "client", "key")

    #: The Client that made it (typed loosely: this module does not import it).
    client: Any

    def __init__(self, key: str, client: Any, owner: FutureOwner) -> None:
        self.key = key
        self.client = client
        self._owner = owner
        owner.hold(key)

    @property
    def status(self) -> str:
        """``"pending"``, ``"finished"``, ``"error"``, ``"cancelled"`` or ``"lost"``."""
        return self._owner.status(self.key)

    def done(self) -> bool:
        """True once the task finished, raised, was cancelled or its result is lost."""
        return self.status != "pending"

    def add_done_callback(self, fn: Callable[[Future[IsAsync]], object]) -> None:
        """Call ``fn(future)`` once the task is done, however it ended (at once
        if it is already). For a synchronous client it runs in a thread of its
        own; for an asynchronous one, on the client's loop."""
        self._owner.add_done_callback(self.key, lambda: fn(self))

    @overload
    def result(self: Future[Literal[False]], timeout: float | None = None) -> Any: ...
    @overload
    def result(
        self: Future[Literal[True]], timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]: ...
    def result(self, timeout: float | None = None) -> Any:
        """The task's result; its exception, of the same type, if it raised.

        A coroutine when the client is asynchronous.
        """
        return self._owner.result(self.key, timeout)

    @overload
    def exception(
        self: Future[Literal[False]], timeout: float | None = None
    ) -> BaseException | None: ...
    @overload
    def exception(
        self: Future[Literal[True]], timeout: float | None = None
    ) -> Coroutine[Any, Any, BaseException | None]: ...
    def exception(self, timeout: float | None = None) -> Any:
        """The task's exception, or None if it succeeded."""
        return self._owner.exception(self.key, timeout)

    @overload
    def cancel(self: Future[Literal[False]]) -> None: ...
    @overload
    def cancel(self: Future[Literal[True]]) -> Coroutine[Any, Any, None]: ...
    def cancel(self) -> Any:
        return self._owner.cancel([self.key])

    def __await__(self) -> Generator[Any, None, Any]:
        return self._owner.awaitable_result(self.key).__await__()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self._owner.drop(self.key)

    def __repr__(self) -> str:
        return f"<Future {self.key} {self.status}>"

    def __dask_tokenize__(self) -> tuple[str, str]:
        """Dask names what holds this future by its key (it will not pickle)."""
        return ("apportion.Future", self.key)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a Future cannot be pickled; pass it to submit() directly so the task gets its result"
        )


def owner_of(future: Future[Any]) -> FutureOwner:
    """The part of its client a future talks to (for client_sdk's own modules)."""
    return future._owner
