"""The worker's memory monitor: measure, ask the policy, act, report.

A small task on the worker's event loop: every :data:`SAMPLE_INTERVAL_S` it
reads the resident memory of the process and its children (a read of /proc
each, tens of microseconds; see
:class:`~apportion_common.process_memory.Resident`), asks
:class:`~.memory.MemoryPolicy` what to do, spills in a thread (writing files
must neither stall the loop nor hold up the next measurement: a worker
making results faster than its disk takes them pauses), pauses or resumes
the worker, and leaves the figures for the scheduler: at once when the
worker pauses or resumes, else with the next heartbeat. A result stored past
the target wakes it early (:attr:`.store.ResultStore.on_over_target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .memory import MemoryPolicy
from .store import ResultStore
from .wire import Reports

log = logging.getLogger("worker_service")

#: How often memory is measured where there is a limit (Dask's is 100 ms).
SAMPLE_INTERVAL_S = 0.1
#: ... and where there is none (the figures are only shown).
UNLIMITED_INTERVAL_S = 1.0
#: Figures unchanged by a pause go to the scheduler at most this often.
REPORT_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class MemorySample:
    """What the worker tells the scheduler of its memory."""

    process: int
    spilled: int
    paused: bool


class Link(Protocol):
    """Where the figures go: the worker's reports to the scheduler."""

    reports: Reports

    def wake(self) -> None: ...


class MemoryMonitor:
    def __init__(
        self,
        policy: MemoryPolicy,
        store: ResultStore,
        measure: Callable[[], int],
        on_pause: Callable[[bool], None],
        link: Link,
    ) -> None:
        self.policy = policy
        self._store = store
        self._measure = measure
        #: the worker pauses or resumes (on the loop)
        self._on_pause = on_pause
        self._link = link
        self._wake = asyncio.Event()
        self._last_report = 0.0
        self._warned = False
        #: the latest figures
        self.sample = MemorySample(0, 0, False)
        #: the spill going on in a thread, if any
        self.spilling: asyncio.Task[None] | None = None
        store.target = policy.target_bytes
        store.on_over_target = self._wake.set

    def resend(self) -> None:
        """A new scheduler stream: it must hear the figures (a pause above all) now."""
        self._report(now=True)
        self._last_report = time.monotonic()

    def _report(self, now: bool) -> None:
        """The figures for the scheduler: sent ``now``, or with what goes next."""
        sample = self.sample
        self._link.reports.memory = (sample.process, sample.spilled, sample.paused)
        if now:
            self._link.wake()

    async def run(self) -> None:
        interval = SAMPLE_INTERVAL_S if self.policy.limit else UNLIMITED_INTERVAL_S
        try:
            while True:
                await self.check()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if self.spilling is not None:
                # The thread finishes what it writes; the store's close removes it.
                await asyncio.gather(self.spilling, return_exceptions=True)

    async def check(self) -> None:
        """One round: measure; start spilling if need be (in a thread, one
        spill at a time: the next round goes on measuring and pausing
        meanwhile, and one starts as soon as it ends); pause or resume;
        report."""
        store = self._store
        was_paused = self.policy.paused
        process = self._measure()
        action = self.policy.decide(process, store.managed)
        if not action.spill:
            self._warned = False  # said again if it happens again
        elif self.spilling is None or self.spilling.done():
            self.spilling = asyncio.create_task(self._spill(action.spill))
        self.sample = MemorySample(process, store.spilled_bytes, action.paused)
        changed = action.paused != was_paused
        if changed:
            log.warning(
                "memory %d MB of a %d MB limit: %s",
                process // 10**6,
                self.policy.limit // 10**6,
                "paused: starting no new task" if action.paused else "resuming",
            )
            self._on_pause(action.paused)
        now = time.monotonic()
        if changed or now - self._last_report >= REPORT_INTERVAL_S:
            self._report(now=changed)
            self._last_report = now

    async def _spill(self, nbytes: int) -> None:
        freed = await asyncio.to_thread(self._store.spill, nbytes)
        self._wake.set()  # measure again now: resume, or spill more
        if not freed and not self._warned:
            self._warned = True
            log.warning(
                "memory use is high (%d MB of a %d MB limit) but no result is left to spill: "
                "tasks themselves, or a leak, use it",
                self._measure() // 10**6,
                self.policy.limit // 10**6,
            )
