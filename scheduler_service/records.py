"""The scheduler's records: what it knows of each task and each worker, the
run (lease) a task holds on a worker, and the small values the parts of the
state machine share (the clock, the marks of what changed).

Owns no behaviour beyond reading one record (``WorkerRecord.held``,
``WorkerRecord.room``, :func:`key_prefix`). Each field is written by one part
only, named beside it: the books (:mod:`.books`) write a worker's capacity and
runs, the placement pass (:mod:`.placer`) its reservation and a task's
assignment, the graph (:mod:`.graph`) where results are and how tasks move
between states, the ready queues (:mod:`.queues`) a task's place in them, the
clients (:mod:`.clients`) who wants what. Must never import another part of
the scheduler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from apportion_common.gpus import GpuDevice
from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo

from .events import ClientId, WorkerId


class TaskState(StrEnum):
    """Where a task stands::

    waiting     some inputs are not in memory yet
    ready       inputs in memory, queued for a worker with free capacity
    processing  assigned to a worker: holding its resources there (a run),
                or in that worker's queue, holding nothing yet (a queued run)
    memory      finished; the result lives on one or more workers
    released    finished once, result dropped; kept so it can be recomputed
    erred       raised (or an input erred); the error is kept for clients
    """

    WAITING = "waiting"
    READY = "ready"
    PROCESSING = "processing"
    MEMORY = "memory"
    RELEASED = "released"
    ERRED = "erred"


# Module globals, so that hot paths compare with a global lookup, not an
# attribute lookup on the enum.
WAITING = TaskState.WAITING
READY = TaskState.READY
PROCESSING = TaskState.PROCESSING
MEMORY = TaskState.MEMORY
RELEASED = TaskState.RELEASED
ERRED = TaskState.ERRED

#: What makes two waiting tasks interchangeable for placement: their resource
#: needs and, when strict, the workers they are restricted to.
Shape = tuple[tuple[tuple[str, int], ...], frozenset[str]]

#: The "any worker" restriction, shared by every unrestricted task.
NO_WORKERS: frozenset[str] = frozenset()


@dataclass(slots=True)
class Run:
    """One lease: a task's resources held on a worker from its start until its
    code returns, or, while queued there, the place it takes in that worker's
    queue (holding nothing yet). Released exactly once, by the books."""

    key: str
    resources: Quanta
    #: when it was assigned (the latest Tick's time then): how long a queued
    #: run has waited for its worker to start it
    since: float = 0.0


@dataclass(slots=True, eq=False)
class WorkerRecord:
    worker_id: WorkerId
    name: str
    address: str
    nthreads: int
    # --- the books' (books.py), and only theirs to change
    declared: Quanta
    free: Quanta
    free_slots: int
    runs: dict[int, Run] = field(default_factory=dict)
    #: assigned runs in its queue, holding nothing yet, in assignment order
    queued: dict[int, Run] = field(default_factory=dict)
    #: the most runs it may hold queued (tasks of a kind may be held to fewer:
    #: the placement pass's queue depth)
    queue_limit: int = 0
    #: what its queued runs need, together
    queued_need: Quanta = field(default_factory=dict)
    #: declared was lowered below what running tasks hold; free may be < 0
    #: until they end (nothing new that needs the resource starts meanwhile)
    shrunk: bool = False
    #: the run id of the latest run that started here (assigned into free
    #: capacity, or reported started from the queue). Run ids grow with
    #: assignment order, so a queued run with a lower id was overtaken.
    last_started: int = 0
    # --- the graph's (graph.py)
    #: keys whose results this worker holds
    has: set[str] = field(default_factory=set)
    # --- the placement pass's (placer.py)
    #: a starving task this worker is kept for: nothing else starts here
    reserved_for: str | None = None
    pid: int = 0
    #: its declared amounts as the user wrote them ("100GB"), for status only
    declared_text: dict[str, str] = field(default_factory=dict)
    #: equal for workers that may share memory segments ("" unknown)
    host_id: str = ""
    #: being retired: nothing new is placed here (see retirement.py)
    retiring: bool = False
    #: drained and told to exit; gone once its stream ends
    told_to_retire: bool = False
    #: its GPUs where it knows them (GPU=auto), and which task holds which
    #: (device id -> keys), as it last said: for status only
    gpus: tuple[GpuDevice, ...] = ()
    gpu_use: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: bytes of memory its process may use (0: none), its resident bytes and
    #: the bytes it spilled to disk, as it last said: for status only (this
    #: memory is not the MEMORY resource, which the books account)
    memory_limit: int = 0
    memory: int = 0
    spilled_bytes: int = 0
    # --- the books' (books.py)
    #: past its pause fraction of memory: nothing new is placed here
    paused: bool = False
    #: the latest run id assigned anywhere when it paused: none above it may
    #: be on this worker while it stays paused
    paused_after: int = 0

    def held(self) -> Quanta:
        return {name: self.declared[name] - self.free[name] for name in self.declared}

    def room(self) -> Room:
        """What is free once every queued run has started: a task placed
        within it fits on the worker whichever of them it started meanwhile."""
        need = self.queued_need
        free = {name: amount - need.get(name, 0) for name, amount in self.free.items()}
        for name, amount in need.items():
            free.setdefault(name, -amount)
        return Room(self.worker_id, self.nthreads, self.free_slots - len(self.queued), free)


@dataclass(slots=True)
class Room:
    """A worker as placement into free capacity sees it (see WorkerRecord.room)."""

    worker_id: WorkerId
    nthreads: int
    free_slots: int
    free: Quanta


@dataclass(slots=True, eq=False)
class TaskRecord:
    key: str
    payload: bytes
    resources: Quanta
    shape: Shape
    dependencies: tuple[str, ...]
    priority: int
    retries_left: int
    seq: int
    state: TaskState = WAITING
    waiting_on: set[str] = field(default_factory=set)
    dependents: set[str] = field(default_factory=set)
    #: the clients' (clients.py); the graph reads it
    wanted_by: set[ClientId] = field(default_factory=set)
    who_has: set[WorkerId] = field(default_factory=set)
    nbytes: int = 0
    #: its current run (the placement pass sets it, the graph clears it)
    worker_id: WorkerId | None = None
    run_id: int = 0
    #: its entry in its shape's ready queue (queues.py)
    ready_gen: int = 0
    #: when it last became ready (the latest Tick's time then)
    ready_since: float = 0.0
    #: worker names or addresses it may run on (any when empty)
    allowed: frozenset[str] = frozenset()
    #: with ``allowed``: a preference only
    loose: bool = False
    #: workers that died while running it (KilledWorker after too many)
    suspects: list[str] = field(default_factory=list)
    error: ErrorInfo | None = None
    waiting_reason: str = ""
    #: names this task (not a run of it) across scheduler restarts, so that a
    #: result a worker kept is never taken for that of another task of the key
    incarnation: int = 0
    #: run in a child process seeing only its GPUs (TaskSpec.isolate)
    isolate: bool = False
    #: its kind: the key without a trailing token ("load" of "load-1f3a..."),
    #: whose measured durations size worker queues
    prefix: str = ""
    #: the longest chain of inputs behind it (0: it has none)
    depth: int = 0


def named(task: TaskRecord, worker: WorkerRecord) -> bool:
    """``worker`` is one that ``task`` names in ``workers=`` (by name or address)."""
    return worker.name in task.allowed or worker.address in task.allowed


#: The trailing part of a key that makes it unique: a hex token or a number.
_KEY_TOKEN = re.compile(r"-(?:[0-9a-f]{8,}|[0-9]+)$")


def key_prefix(key: str) -> str:
    """The kind of task a key names, as Dask's key_split: ``"load"`` of
    ``"load-1f3a9c0b..."`` and of ``"load-17"``; a key without such a token is
    its own kind."""
    return _KEY_TOKEN.sub("", key, count=1)


@dataclass(slots=True)
class Clock:
    """Time as the events told it. Written by ClusterState alone (on Tick and
    StateRecovered); the parts read it."""

    #: the latest Tick's time (monotonic seconds)
    now: float = 0.0
    #: after a restart from the journal, nothing is placed until then (0: not
    #: recovering)
    hold_until: float = 0.0


@dataclass(slots=True)
class Changes:
    """What changed since the last placement pass, for that pass to look at.

    After a pass, the head of every waiting shape fits no worker it may use
    (and no worker queue with room); only a worker that gained room or a shape
    that gained a task can change that, so a pass checks just those. The books
    and the ready queues mark these as they change (no event handler has to);
    the placement pass takes them, leaving them empty.
    """

    #: check every worker for every shape (a worker left, a recovery ended)
    everything: bool = True
    #: workers that gained room (a run ended, one joined, grew, or lost its
    #: reservation)
    workers: set[WorkerId] = field(default_factory=set)
    #: workers whose queue gained a place (or that joined, grew, or lost
    #: their reservation)
    queues: set[WorkerId] = field(default_factory=set)
    #: shapes that gained a ready task
    shapes: set[Shape] = field(default_factory=set)
    #: time passed: a starving task may get a worker reserved
    ticked: bool = False
