"""The dashboard page's live feed, and the event loop's lag.

:class:`Feed` builds one snapshot a second (:func:`.view.page_snapshot`), only
while at least one page listens, and hands the same encoded bytes to every
listener: ten open pages cost what one does. It also remembers the workers
that left while someone watched, to show them as lost (or retired) for a
minute.

:class:`LoopLag` measures how late a short sleep wakes: what every call and
stream on the scheduler's loop waits on top of its own work.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from .activity import RunActivity
from .demand import waiting
from .view import page_snapshot, worker_rows

if TYPE_CHECKING:
    from ..state import ClusterState

#: Seconds between two snapshots of the page.
FEED_INTERVAL_S = 1.0
#: How long a worker that left stays on the page.
GONE_SHOWN_S = 60.0


class Feed:
    def __init__(
        self,
        state: ClusterState,
        activity: RunActivity,
        interval: float = FEED_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._activity = activity
        self._interval = interval
        self._clock = clock
        self.listeners = 0
        self._closed = False
        self._latest = b""
        self._version = 0
        self._built = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._last_rows: dict[int, dict[str, Any]] = {}
        #: worker id -> (its last row, when it was seen gone)
        self._gone: dict[int, tuple[dict[str, Any], float]] = {}

    def build(self) -> dict[str, Any]:
        """The page's snapshot now."""
        now = self._clock()
        rows = worker_rows(self._state)
        current = {row["id"]: row for row in rows}
        for worker_id, row in self._last_rows.items():
            if worker_id not in current and worker_id not in self._gone:
                left = dict(row, state="retired" if row["state"] == "draining" else "lost")
                self._gone[worker_id] = (left, now)
        self._last_rows = current
        for worker_id, (_, since) in list(self._gone.items()):
            if now - since > GONE_SHOWN_S:
                del self._gone[worker_id]
        shown = rows + [row for row, _ in self._gone.values()]
        return page_snapshot(self._state, self._activity, waiting(self._state), now, shown)

    async def updates(self) -> AsyncGenerator[bytes, None]:
        """Each new snapshot, JSON-encoded, for as long as the caller listens."""
        self.listeners += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())
        seen = 0
        try:
            while not self._closed:
                built = self._built
                if self._version > seen:
                    seen = self._version
                    yield self._latest
                    continue
                await built.wait()
        finally:
            self.listeners -= 1

    async def _tick(self) -> None:
        while self.listeners > 0:
            self._latest = json.dumps(self.build(), separators=(",", ":")).encode()
            self._version += 1
            built, self._built = self._built, asyncio.Event()
            built.set()
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """End every listener's updates (open pages reconnect to the next scheduler)."""
        self._closed = True
        self._built.set()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)


#: Seconds between two lag measurements.
LAG_INTERVAL_S = 0.5


class LoopLag:
    def __init__(self, interval: float = LAG_INTERVAL_S) -> None:
        self._interval = interval
        #: the lateness of the latest wake-up, in seconds
        self.seconds = 0.0

    async def run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self._interval)
            self.seconds = max(0.0, time.monotonic() - asked - self._interval)
