"""A worker's part in its retirement: hand over results, drain on SIGTERM, exit.

The scheduler drains a retiring worker (see ``scheduler_service.retirement``):
it places nothing new there, asks other workers to copy what it still holds
that is wanted (:meth:`Retiring.replicate`, run on the receiving worker), and
says "retire" once nothing is left. SIGTERM asks for the same, and the
worker stops after ``--drain-timeout`` seconds whether or not it was told.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from apportion_common.locations import InputLocation

from .inputs import InputFetcher
from .store import ResultStore
from .wire import Reports

log = logging.getLogger("worker_service")

#: How long SIGTERM lets a worker drain before it stops anyway (--drain-timeout).
DEFAULT_DRAIN_TIMEOUT_S = 30.0
#: The status a worker told to restart exits with: its nanny starts it again
#: at once (a retired one exits with 0 and is not started again).
RESTART_EXIT_CODE = 3


class Link(Protocol):
    reports: Reports
    #: a stream to the scheduler is registered now
    registered: asyncio.Event
    #: the registered stream ended
    lost: asyncio.Event

    def wake(self) -> None: ...


class Retiring:
    def __init__(self, store: ResultStore, fetcher: InputFetcher, link: Link) -> None:
        self._store = store
        self._fetcher = fetcher
        #: the worker's stream to the scheduler
        self.link = link
        #: set when the scheduler says this worker is drained: it exits
        self.retired = asyncio.Event()
        #: the status to exit with then (RESTART_EXIT_CODE: start me again)
        self.exit_code = 0
        #: this worker asked to retire (it says so again on a new stream)
        self.asked = False
        self._copies: set[asyncio.Task[None]] = set()

    def ask(self) -> None:
        """Ask the scheduler to drain and retire this worker."""
        self.asked = True
        self.link.reports.retire_me = True
        self.link.wake()

    def registered(self) -> None:
        if self.asked:
            self.link.reports.retire_me = True  # a new stream, a new scheduler maybe

    def replicate(self, item: InputLocation) -> None:
        """Take a copy of ``item`` (a retiring worker hands it over) and report it."""
        copy = asyncio.create_task(self._copy(item))
        self._copies.add(copy)
        copy.add_done_callback(self._copies.discard)

    async def _copy(self, item: InputLocation) -> None:
        nbytes = self._store.nbytes(item.key)  # not read back if spilled
        if nbytes is None:
            data, _ = await self._fetcher.fetch_one(item, "a copy from a retiring worker")
            if data is None:
                return  # the scheduler asks again, maybe of another worker
            self._store.put(item.key, 0, data)
            nbytes = data.nbytes
        self.link.reports.acquired.append((item.key, nbytes))
        self.link.wake()

    async def close(self) -> None:
        for copy in self._copies:
            copy.cancel()
        await asyncio.gather(*self._copies, return_exceptions=True)


async def drain(retiring: Retiring, timeout: float) -> bool:
    """Ask to retire, then wait to be told (True); False at ``timeout``, or
    at once without a scheduler to drain to (nobody could take the results,
    and stopping is what was asked)."""
    link = retiring.link
    if not link.registered.is_set():
        log.info("no scheduler to drain to: stopping")
        return False
    retiring.ask()
    log.info("draining before stopping (at most %gs)", timeout)
    told = asyncio.create_task(retiring.retired.wait())
    lost = asyncio.create_task(link.lost.wait())
    try:
        await asyncio.wait({told, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        told.cancel()
        lost.cancel()
    if retiring.retired.is_set():
        return True
    if link.lost.is_set():
        log.warning("lost the scheduler while draining: stopping")
    else:
        log.warning("not drained within %gs; stopping anyway", timeout)
    return False
