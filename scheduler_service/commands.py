"""Commands out of the scheduler's state machine: orders, in the imperative.

``ClusterState.handle(event)`` answers with these; the servicer sends each to
the worker or client it names (or to the journal), turning it into protobuf
there. Plain data, as the events (:mod:`.events`) are.
"""

from __future__ import annotations

from dataclasses import dataclass

from apportion_common.locations import InputLocation
from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo
from apportion_common.status import TaskStatus

from .events import ClientId, TaskSubmission, WorkerId

# ------------------------------------------------------------------ to workers


# Not frozen, though never changed: one is built per task, and a frozen
# dataclass's __init__ sets each field through object.__setattr__, a cost on
# every placement decision. So for NotifyClient and events.TaskFinished.
@dataclass(slots=True)
class AssignTask:
    worker_id: WorkerId
    key: str
    run_id: int
    payload: bytes
    resources: Quanta
    inputs: tuple[InputLocation, ...]
    incarnation: int = 0
    #: to the worker's queue: it holds nothing until the worker starts it
    queued: bool = False
    #: the task's priority and depth: a worker starts queued runs in that order
    priority: int = 0
    depth: int = 0
    #: run in a child process seeing only its GPUs (TaskSpec.isolate)
    isolate: bool = False


@dataclass(frozen=True, slots=True)
class CancelRun:
    worker_id: WorkerId
    key: str
    run_id: int


@dataclass(frozen=True, slots=True)
class ReleaseData:
    """Drop a stored result. ``run_id`` 0 drops whatever is stored under ``key``;
    otherwise only the result of that run (a late result of a cancelled run)."""

    worker_id: WorkerId
    key: str
    run_id: int = 0


@dataclass(frozen=True, slots=True)
class DeclareResources:
    """Tell a worker what it now declares (its own books must agree)."""

    worker_id: WorkerId
    resources: Quanta


@dataclass(frozen=True, slots=True)
class TellHostPeers:
    """Tell a worker how many other workers share its host (see shared memory)."""

    worker_id: WorkerId
    count: int


@dataclass(frozen=True, slots=True)
class ReplicateData:
    """Tell a worker to take a copy of a result from where it lives."""

    worker_id: WorkerId
    location: InputLocation


@dataclass(frozen=True, slots=True)
class RetireWorker:
    """Tell a drained worker to exit (its nanny does not start it again)."""

    worker_id: WorkerId


@dataclass(frozen=True, slots=True)
class RestartWorker:
    """Tell a worker to exit so that its nanny starts it afresh."""

    worker_id: WorkerId


@dataclass(frozen=True, slots=True)
class UploadFiles:
    """Files for a worker's tasks to import (sent by the servicer to a worker
    that joins after they were uploaded; the state machine never sees them)."""

    worker_id: WorkerId
    files: tuple[tuple[str, bytes], ...]


# ------------------------------------------------------------------ to clients


@dataclass(slots=True)  # not frozen: see AssignTask
class NotifyClient:
    """Tell a client where a task it wants stands."""

    client_id: ClientId
    key: str
    status: TaskStatus
    addresses: tuple[str, ...] = ()
    nbytes: int = 0
    error: ErrorInfo | None = None
    waiting_reason: str = ""
    inline_result: bytes = b""


# ------------------------------------------------- to the journal (--state-dir)


@dataclass(frozen=True, slots=True)
class JournalTask:
    """Write down a new task, first wanted by ``client_id`` (its spec)."""

    key: str
    incarnation: int
    client_id: ClientId
    submission: TaskSubmission


@dataclass(frozen=True, slots=True)
class JournalWant:
    """Write down that another client wants an existing task."""

    client_id: ClientId
    key: str


@dataclass(frozen=True, slots=True)
class JournalUnwant:
    """Strike out a client's want of a task (it released or cancelled it)."""

    client_id: ClientId
    key: str


@dataclass(frozen=True, slots=True)
class JournalForgetClient:
    """Strike out a client that left for good (what it alone wanted is
    already forgotten)."""

    client_id: ClientId


@dataclass(frozen=True, slots=True)
class JournalForgetTask:
    """Strike out a task the scheduler forgot."""

    key: str


@dataclass(frozen=True, slots=True)
class JournalFailure:
    """Write down that a task erred for good (a restart keeps the error and
    does not run it again)."""

    key: str
    error: ErrorInfo


#: What the scheduler tells its journal (only when it keeps one).
JournalCommand = (
    JournalTask
    | JournalWant
    | JournalUnwant
    | JournalForgetClient
    | JournalForgetTask
    | JournalFailure
)
JOURNAL_COMMANDS = (
    JournalTask,
    JournalWant,
    JournalUnwant,
    JournalForgetClient,
    JournalForgetTask,
    JournalFailure,
)

Command = (
    AssignTask
    | CancelRun
    | ReleaseData
    | DeclareResources
    | TellHostPeers
    | ReplicateData
    | RetireWorker
    | RestartWorker
    | UploadFiles
    | NotifyClient
    | JournalCommand
)
