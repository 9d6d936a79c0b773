"""The worker's state machine: its run queue and its ledger, apart from all I/O.

Each method is a stimulus (a run assigned, a run's code returned, a cancel,
a new declaration) and says what follows from it: which runs start now. It
never awaits, reads a clock, touches a socket or runs task code, so tests drive
it step by step and call :meth:`WorkerState.validate` after every one. The
worker calls it from its event loop and from its task threads, holding one lock.

A run assigned ``queued`` holds nothing until it starts here. Queued runs
start in the scheduler's order (highest priority, then deepest in its graph,
then the oldest), and **a queued run that fits in what is free never waits**:
every stimulus that frees capacity starts, at once, each queued run that then
fits, in that order, skipping those that do not. A run that needs what is busy
therefore never holds back one that needs only what is free (as Dask's worker
picks up ready tasks while constrained ones wait). Starvation of a large run
behind small ones is prevented by the scheduler, which stops sending this
worker new tasks while an overtaken queued run waits (its reservation).

A worker whose memory is past its pause fraction is **paused** (:meth:`pause`):
it starts nothing new. Runs the scheduler sent before it heard are kept
rather than refused (it would only have to place them again): a queued one
waits in the queue; one sent into free capacity takes its lease at once, as
the scheduler already counts it, and waits holding it (``pause_waiting``).
Resuming starts those first, then every queued run that fits.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from apportion_common.resources import Quanta

from .assignment import Assignment
from .devices import DeviceLedger
from .ledger import Ledger, OverCommitted

#: The resource that stands for whole devices where a worker knows its GPUs.
GPU = "GPU"


class InvariantError(AssertionError):
    """``validate()`` found the worker's books or queue out of order."""


@dataclass(slots=True)
class _Queued:
    assignment: Assignment
    #: (-priority, -depth, arrival): the order queued runs start in
    rank: tuple[int, int, int]


def _rank(queued: _Queued) -> tuple[int, int, int]:
    return queued.rank


@dataclass(frozen=True, slots=True)
class Refused:
    """An assignment this worker will not run; the scheduler hears why (as a
    failure of that run) when ``report`` is set."""

    assignment: Assignment
    reason: str
    report: bool = True


@dataclass(slots=True)  # not frozen: one is made per run (see Assignment)
class Ended:
    """A run gave its lease back. ``cancelled``: the scheduler cancelled it
    meanwhile (report it so, whatever its code did). ``started``: queued runs
    that fit in what it freed, started now, in order."""

    cancelled: bool
    started: list[Assignment]


class WorkerState:
    def __init__(self, declared: Quanta, nthreads: int, gpus: Sequence[str] = ()) -> None:
        self.ledger = Ledger(declared, nthreads)
        #: which run holds which GPU, where the worker knows its devices
        self.devices = DeviceLedger(gpus) if gpus else None
        #: runs holding their lease that wait for a device to free (packing
        #: left room on several devices but not on one), in arrival order
        self.device_waiting: list[Assignment] = []
        #: queued runs that took their lease but wait for a device: the
        #: scheduler must hear they started (they hold their resources now)
        self.started_waiting: list[Assignment] = []
        #: runs holding a lease here (running, or fetching inputs to run)
        self.running: set[int] = set()
        #: runs among ``running`` that the scheduler cancelled
        self.cancelled: set[int] = set()
        #: queued runs by run id
        self.queue: dict[int, _Queued] = {}
        #: memory past the pause fraction: nothing new starts
        self.paused = False
        #: runs sent into free capacity while paused: holding their lease,
        #: they start when the worker resumes (in arrival order)
        self.pause_waiting: list[Assignment] = []
        #: the same, in the order they start in
        self._order: list[_Queued] = []
        self._arrivals = itertools.count()

    # ------------------------------------------------------------ stimuli

    def assign(self, a: Assignment) -> Assignment | Refused | None:
        """A run from the scheduler: the assignment if it starts now (its
        lease is taken), None if it waits in the queue, or why it is refused."""
        if a.run_id in self.running or a.run_id in self.queue:
            return Refused(a, f"run {a.run_id} is here already", report=False)
        if not a.queued:
            try:
                self.ledger.acquire(a.run_id, a.need)
            except OverCommitted as exc:
                return Refused(a, str(exc))
            self.running.add(a.run_id)
            if self.paused:
                self.pause_waiting.append(a)
                return None
            return a if self._give_devices(a) else None
        if not self.ledger.could_ever_fit(a.need):
            # The scheduler queued it here for good: it would never start.
            return Refused(a, f"run {a.run_id} needs more than this worker declares")
        if not self.paused and self.ledger.fits(a.need):
            self.ledger.acquire(a.run_id, a.need)
            self.running.add(a.run_id)
            return a if self._give_devices(a) else None
        queued = _Queued(a, (-a.priority, -a.depth, next(self._arrivals)))
        self.queue[a.run_id] = queued
        bisect.insort(self._order, queued, key=_rank)
        return None

    def end(self, run_id: int) -> Ended:
        """A run's code returned (or it never got that far): its lease goes
        back, exactly once, and the queued runs that now fit start."""
        self.ledger.release(run_id)
        self.running.discard(run_id)
        cancelled = run_id in self.cancelled
        if cancelled:
            self.cancelled.discard(run_id)
        started: list[Assignment] = []
        if self.devices is not None:
            self.devices.release(run_id)
            started = self._start_device_waiting()
        if self.queue and not self.paused:
            started += self._start_fitting()
        return Ended(cancelled, started)

    def cancel(self, run_id: int) -> Assignment | None:
        """The scheduler cancelled a run. A queued one is dropped unstarted and
        returned (report it cancelled now); a running one is marked, and its
        lease stays until its code returns (threads cannot be interrupted)."""
        waiting = next((a for a in self.pause_waiting if a.run_id == run_id), None)
        if waiting is not None:
            # Never started: dropped, its lease back (reported cancelled).
            self.pause_waiting.remove(waiting)
            self.ledger.release(run_id)
            self.running.discard(run_id)
            self.cancelled.discard(run_id)
            return waiting
        if run_id in self.running:
            self.cancelled.add(run_id)
            return None
        queued = self.queue.pop(run_id, None)
        if queued is None:
            return None
        self._order.remove(queued)
        return queued.assignment

    def declare(self, declared: Quanta) -> list[Assignment]:
        """The operator changed what this worker declares: runs holding more
        finish; queued runs that now fit start."""
        self.ledger.declare(declared)
        return [] if self.paused else self._start_fitting()

    def pause(self, paused: bool) -> list[Assignment]:
        """The worker's memory crossed its pause fraction (``paused``) or fell
        back below it: on resuming, the runs that waited holding their lease
        start, then every queued run that fits, in order."""
        if paused == self.paused:
            return []
        self.paused = paused
        if paused:
            return []
        started = [a for a in self.pause_waiting if self._give_devices(a)]
        self.pause_waiting = []
        return started + self._start_fitting()

    def drop_queue(self) -> list[Assignment]:
        """The scheduler is gone (or the worker closes): every queued run is
        dropped unstarted (the scheduler places them again)."""
        dropped = [queued.assignment for queued in self._order]
        self.queue.clear()
        self._order.clear()
        # Runs waiting for a device never began either: their leases go back.
        for a in self.device_waiting:
            self.ledger.release(a.run_id)
            self.running.discard(a.run_id)
            self.cancelled.discard(a.run_id)
        for a in self.pause_waiting:
            self.ledger.release(a.run_id)
            self.running.discard(a.run_id)
            self.cancelled.discard(a.run_id)
        dropped += self.device_waiting + self.pause_waiting
        self.device_waiting = []
        self.pause_waiting = []
        self.started_waiting = []
        return dropped

    # ---------------------------------------------------------- inspection

    @property
    def busy(self) -> bool:
        """Runs hold leases here or wait in the queue (more reports soon)."""
        return bool(self.running or self.queue)

    def queued_in_order(self) -> list[Assignment]:
        return [queued.assignment for queued in self._order]

    def _start_fitting(self) -> list[Assignment]:
        """Start every queued run that fits, in order, each taking its lease
        before the next is tried."""
        started: list[Assignment] = []
        ledger = self.ledger
        for queued in list(self._order):
            if len(ledger.held) >= ledger.nthreads:
                break  # no thread left: nothing more fits
            a = queued.assignment
            if ledger.fits(a.need):
                ledger.acquire(a.run_id, a.need)
                self.running.add(a.run_id)
                del self.queue[a.run_id]
                self._order.remove(queued)
                if self._give_devices(a):
                    started.append(a)
        return started

    def _give_devices(self, a: Assignment) -> bool:
        """A run that has just taken its lease gets its GPUs (True), or waits
        for a device to free (False). No devices known: GPU is just a number."""
        if self.devices is None or self._allot(a):
            return True
        self.device_waiting.append(a)
        if a.queued:
            self.started_waiting.append(a)
        return False

    def _allot(self, a: Assignment) -> bool:
        """Give ``a`` its devices if they are free now."""
        assert self.devices is not None
        gpus = self.devices.allot(a.run_id, a.key, a.need.get(GPU, 0))
        if gpus is None:
            return False
        a.gpus = gpus
        return True

    def _start_device_waiting(self) -> list[Assignment]:
        """Runs that waited for a device and now get one, in arrival order."""
        started = [a for a in self.device_waiting if self._allot(a)]
        if started:
            begun = {a.run_id for a in started}
            self.device_waiting = [a for a in self.device_waiting if a.run_id not in begun]
        return started

    def validate(self) -> None:
        """Check the books and the queue; raise :class:`InvariantError` naming
        the first fault."""

        def check(condition: bool, message: str) -> None:
            if not condition:
                raise InvariantError(message)

        try:
            self.ledger.validate()
        except AssertionError as exc:
            raise InvariantError(str(exc)) from None
        check(self.running == set(self.ledger.held), "a running run without a lease, or back")
        check(self.cancelled <= self.running, "a cancelled run that is not running")
        check(not (self.running & self.queue.keys()), "a run both queued and running")
        check(
            [q.assignment.run_id for q in self._order] == [*sorted(self.queue, key=self._rank_of)],
            "the queue's order is out of step with its runs",
        )
        check(self._order == sorted(self._order, key=_rank), "the queue is out of order")
        waiting = {a.run_id for a in self.pause_waiting}
        check(waiting <= self.running, "a run waits for the worker to resume without its lease")
        check(self.paused or not waiting, "a run waits for a worker that is not paused")
        for queued in [] if self.paused else self._order:
            check(
                not self.ledger.fits(queued.assignment.need),
                f"queued run {queued.assignment.run_id} fits in what is free but waits",
            )
        devices = self.devices
        if devices is None:
            check(not self.device_waiting, "a run waits for a device on a worker without any")
            return
        try:
            devices.validate()
        except AssertionError as exc:
            raise InvariantError(str(exc)) from None
        waiting = {a.run_id for a in self.device_waiting}
        check(waiting <= self.running, "a run waits for a device without its lease")
        check(not (waiting & devices.held.keys()), "a run both holds and waits for devices")
        check(devices.held.keys() <= self.running, "devices held by a run that has ended")
        for a in self.device_waiting:
            check(
                not devices.fits(a.need.get(GPU, 0)),
                f"run {a.run_id} waits for a device that is free",
            )

    def _rank_of(self, run_id: int) -> tuple[int, int, int]:
        return self.queue[run_id].rank
