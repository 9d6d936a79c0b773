"""What the scheduler's runs did lately: counters per key prefix, a duration
histogram, bytes moved between workers, and the last minute of runs for the
dashboard's task stream.

:class:`RunActivity` is fed, after each batch of events, with the events and
the commands the state machine answered with (:meth:`RunActivity.observe`);
it never changes the state. Work per event is O(1): a dict update and a
deque append. Everything costlier (lanes, rates, sums) is done when someone
reads it (:meth:`stream`, :meth:`tasks_per_second`), at most once a second.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..commands import AssignTask, Command
from ..events import (
    DataReplicated,
    Event,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TaskStarted,
    WorkerId,
    WorkerLeft,
)
from ..records import key_prefix

if TYPE_CHECKING:
    from ..state import ClusterState

#: The span of the task stream, in seconds.
STREAM_WINDOW_S = 60.0
#: At most this many ended runs are kept for the stream (the newest).
STREAM_MAX_RUNS = 5_000
#: Key prefixes counted one by one; any further prefix counts as OTHER_PREFIX,
#: so that keys without a common prefix cannot grow the metrics without bound.
MAX_PREFIXES = 200
OTHER_PREFIX = "other"
#: Upper bounds (seconds) of the task-duration histogram's buckets.
DURATION_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    60.0,
    300.0,
    float("inf"),
)
#: Seconds over which the cluster's tasks per second are averaged.
RATE_WINDOW_S = 5

#: How a run ended, in the stream.
OK, ERRED, MISSING, LOST = "ok", "erred", "missing-inputs", "lost"


@dataclass(slots=True)
class Histogram:
    """Observations of one prefix, per bucket of DURATION_BUCKETS_S (not cumulative)."""

    counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS_S))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self.total += seconds


@dataclass(frozen=True, slots=True)
class StreamRun:
    """One run in the task stream: where it ran (a lane is a thread slot), its
    kind, when it started and stopped (monotonic seconds; None: running)."""

    worker_id: WorkerId
    lane: int
    prefix: str
    start: float
    stop: float | None
    status: str


class RunActivity:
    def __init__(self, state: ClusterState) -> None:
        self._state = state
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.erred: dict[str, int] = {}
        self.durations: dict[str, Histogram] = {}
        #: result bytes fetched from peers (or copied to them when one retires)
        self.transfer_bytes = 0
        #: run id -> (worker, prefix, start) of each run that holds resources now
        self._running: dict[int, tuple[WorkerId, str, float]] = {}
        #: ended runs, oldest first: (worker, prefix, start, stop, status)
        self._ended: deque[tuple[WorkerId, str, float, float, str]] = deque(maxlen=STREAM_MAX_RUNS)
        #: runs ended per whole second: [second, count], oldest first
        self._per_second: deque[list[int]] = deque(maxlen=RATE_WINDOW_S + 2)
        self._prefixes: set[str] = set()

    # ------------------------------------------------------------ feeding

    def observe(self, events: Iterable[Event], cmds: Iterable[Command], now: float) -> None:
        """``events`` were handled at ``now`` (monotonic) and answered with ``cmds``."""
        ended = 0
        for event in events:
            if isinstance(event, TaskFinished):
                ended += 1
                self._end(event.run_id, event.worker_id, event.key, now, OK, event.duration)
                if event.fetched:
                    self.transfer_bytes += sum(nbytes for _, nbytes in event.fetched)
            elif isinstance(event, TaskErred | TaskMissingInputs):
                ended += 1
                status = ERRED if isinstance(event, TaskErred) else MISSING
                self._end(event.run_id, event.worker_id, event.key, now, status, 0.0)
            elif isinstance(event, TaskStarted):
                self._started_from_queue(event, now)
            elif isinstance(event, WorkerLeft):
                self._lose_runs(event.worker_id, now)
            elif isinstance(event, DataReplicated):
                self.transfer_bytes += sum(nbytes for _, nbytes in event.acquired)
        for cmd in cmds:
            if isinstance(cmd, AssignTask) and not cmd.queued:
                self._start(cmd.run_id, cmd.worker_id, self._prefix_of(cmd.key), now)
        if ended:
            second = int(now)
            per_second = self._per_second
            if per_second and per_second[-1][0] == second:
                per_second[-1][1] += ended
            else:
                per_second.append([second, ended])

    def _prefix_of(self, key: str) -> str:
        task = self._state.tasks.get(key)
        prefix = task.prefix if task is not None else key_prefix(key)
        if prefix not in self._prefixes:
            if len(self._prefixes) >= MAX_PREFIXES:
                return OTHER_PREFIX
            self._prefixes.add(prefix)
        return prefix

    def _start(self, run_id: int, worker_id: WorkerId, prefix: str, now: float) -> None:
        self._running[run_id] = (worker_id, prefix, now)
        self.started[prefix] = self.started.get(prefix, 0) + 1

    def _started_from_queue(self, event: TaskStarted, now: float) -> None:
        if event.run_id in self._running:
            return
        worker = self._state.workers.get(event.worker_id)
        # A start the books ignored (the run ended in the same batch, counted
        # there) is not a second start.
        if worker is not None and event.run_id in worker.runs:
            self._start(event.run_id, event.worker_id, self._prefix_of(event.key), now)

    def _end(
        self,
        run_id: int,
        worker_id: WorkerId,
        key: str,
        now: float,
        status: str,
        duration: float,
    ) -> None:
        running = self._running.pop(run_id, None)
        if running is None:
            # Started from the worker's queue and ended before the start was
            # reported (both in one batch): it started all the same.
            prefix = self._prefix_of(key)
            self.started[prefix] = self.started.get(prefix, 0) + 1
            start = now - duration
        else:
            _, prefix, start = running
            if duration > 0.0:
                start = max(start, now - duration)
        if status == OK:
            self.finished[prefix] = self.finished.get(prefix, 0) + 1
            histogram = self.durations.get(prefix)
            if histogram is None:
                histogram = self.durations[prefix] = Histogram()
            histogram.observe(duration if duration > 0.0 else now - start)
        elif status == ERRED:
            self.erred[prefix] = self.erred.get(prefix, 0) + 1
        self._ended.append((worker_id, prefix, start, now, status))

    def _lose_runs(self, worker_id: WorkerId, now: float) -> None:
        """The worker is gone, and its runs with it (rare: a sweep is fine)."""
        lost = [run_id for run_id, run in self._running.items() if run[0] == worker_id]
        for run_id in lost:
            _, prefix, start = self._running.pop(run_id)
            self._ended.append((worker_id, prefix, start, now, LOST))

    # ------------------------------------------------------------ reading

    def tasks_per_second(self, now: float) -> float:
        """Runs ended per second over the last RATE_WINDOW_S whole seconds."""
        current = int(now)
        ended = sum(c for s, c in self._per_second if current - RATE_WINDOW_S <= s < current)
        return ended / RATE_WINDOW_S

    def stream(self, now: float, window: float = STREAM_WINDOW_S) -> list[StreamRun]:
        """The runs of the last ``window`` seconds, running ones included, each
        in a lane of its worker: a lane holds one run at a time, as a thread
        does (runs that overlap beyond the worker's threads share the lane
        that came free first)."""
        since = now - window
        runs: list[tuple[WorkerId, float, float | None, str, str]] = [
            (worker_id, start, stop, prefix, status)
            for worker_id, prefix, start, stop, status in self._ended
            if stop >= since
        ]
        runs.extend(
            (worker_id, start, None, prefix, "running")
            for worker_id, prefix, start in self._running.values()
        )
        runs.sort(key=lambda run: (run[0], run[1]))
        out: list[StreamRun] = []
        lanes: list[float] = []
        current: WorkerId | None = None
        for worker_id, start, stop, prefix, status in runs:
            if worker_id != current:
                current = worker_id
                worker = self._state.workers.get(worker_id)
                lanes = [float("-inf")] * (worker.nthreads if worker is not None else 1)
            free = next((i for i, end in enumerate(lanes) if end <= start), None)
            lane = free if free is not None else min(range(len(lanes)), key=lanes.__getitem__)
            lanes[lane] = float("inf") if stop is None else stop
            out.append(StreamRun(worker_id, lane, prefix, start, stop, status))
        return out
