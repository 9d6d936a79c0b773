"""A handle on one task's result, in the style of ``concurrent.futures``."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client


class Future:
    """The result of task ``key``, computed somewhere on the cluster.

    Pass it to ``submit`` (also inside lists, tuples and dicts) to make a task
    that runs after it, on its result. The scheduler keeps the result while any
    Future for the key is alive in this client.
    """

    __slots__ = ("__weakref__", "client", "key")

    def __init__(self, key: str, client: Client) -> None:
        self.key = key
        self.client = client
        client._ref(key)

    @property
    def status(self) -> str:
        """``"pending"``, ``"finished"``, ``"error"`` or ``"cancelled"``."""
        return self.client._key_status(self.key)

    def done(self) -> bool:
        return self.status != "pending"

    def result(self, timeout: float | None = None) -> Any:
        """The task's result; its exception, of the same type, if it raised.

        A coroutine when the client is asynchronous.
        """
        return self.client._result(self.key, timeout)

    def exception(self, timeout: float | None = None) -> Any:
        """The task's exception, or None if it succeeded."""
        return self.client._exception(self.key, timeout)

    def cancel(self) -> Any:
        return self.client.cancel(self)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.client.core.result(self.key).__await__()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.client._unref(self.key)

    def __repr__(self) -> str:
        return f"<Future {self.key} {self.status}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Future cannot be pickled; pass it to submit() directly so the task gets its result"
        )
