"""Events into the scheduler's state machine and the commands it returns.

These are plain data: the servicer turns protobuf messages into events and
commands into protobuf messages, so nothing here knows about gRPC.
Resource amounts are fixed-point integers (see :mod:`apportion_common.resources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo
from apportion_common.status import TaskStatus

WorkerId = int
ClientId = str

# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class TaskSubmission:
    key: str
    payload: bytes
    resources: Quanta
    dependencies: tuple[str, ...] = ()
    priority: int = 0
    retries: int = 0
    #: names or addresses of the workers it may run on (any when empty)
    workers: tuple[str, ...] = ()
    #: with ``workers``: only prefer them (resources are never loosened)
    allow_other_workers: bool = False


@dataclass(frozen=True, slots=True)
class WorkerResourcesChanged:
    """An operator changed what a worker declares, while it runs."""

    worker_id: WorkerId
    resources: Quanta


@dataclass(frozen=True, slots=True)
class HeldResult:
    """A result a (re)joining worker still holds from before."""

    key: str
    incarnation: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker_id: WorkerId
    name: str
    address: str
    nthreads: int
    resources: Quanta
    #: results it kept through a broken stream or a scheduler restart
    held: tuple[HeldResult, ...] = ()
    #: its process id, for operators (status) and fault-injection tests
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock, as an event: the state machine never reads it itself.

    ``now`` is monotonic seconds; the servicer sends one a few times a second
    while tasks wait, so that waiting times (starvation) are measured.
    """

    now: float


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    worker_id: WorkerId


@dataclass(slots=True)  # not frozen: see AssignTask
class TaskFinished:
    worker_id: WorkerId
    key: str
    run_id: int
    nbytes: int
    #: (key, nbytes) of inputs the worker fetched from peers and now holds too.
    fetched: tuple[tuple[str, int], ...] = ()
    #: a small result itself, passed on to the clients waiting for it
    inline_result: bytes = b""
    #: seconds the task's code ran on the worker (0: not measured)
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A run that was queued on the worker took its resources and began."""

    worker_id: WorkerId
    key: str
    run_id: int


@dataclass(frozen=True, slots=True)
class TaskErred:
    worker_id: WorkerId
    key: str
    run_id: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class TaskMissingInputs:
    worker_id: WorkerId
    key: str
    run_id: int
    #: (input key, address the worker failed to fetch it from)
    missing: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ClientJoined:
    client_id: ClientId
    #: on a reconnect: the keys it still holds futures of (told their state again)
    resume: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClientLeft:
    """The client closed its stream: the tasks only it wanted go at once."""

    client_id: ClientId


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    """The client's stream broke at ``at``: it has the policy's grace period
    to come back before it counts as gone."""

    client_id: ClientId
    at: float


@dataclass(frozen=True, slots=True)
class RecoveredTask:
    """A task read back from the journal after a restart."""

    submission: TaskSubmission
    incarnation: int
    wanted_by: tuple[ClientId, ...]
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class StateRecovered:
    """The journal's tasks, in submission order, at startup (time ``now``)."""

    tasks: tuple[RecoveredTask, ...]
    now: float


@dataclass(frozen=True, slots=True)
class TasksSubmitted:
    client_id: ClientId
    tasks: tuple[TaskSubmission, ...]


@dataclass(frozen=True, slots=True)
class TasksCancelled:
    client_id: ClientId
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeysReleased:
    client_id: ClientId
    keys: tuple[str, ...]


Event = (
    Tick
    | WorkerJoined
    | WorkerResourcesChanged
    | WorkerLeft
    | TaskFinished
    | TaskStarted
    | TaskErred
    | TaskMissingInputs
    | ClientJoined
    | ClientLeft
    | ClientDisconnected
    | StateRecovered
    | TasksSubmitted
    | TasksCancelled
    | KeysReleased
)

# ------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class InputLocation:
    key: str
    addresses: tuple[str, ...]
    nbytes: int


# Not frozen, though never changed: one is built per task, and a frozen
# dataclass's __init__ sets each field through object.__setattr__ (0.6 us a
# decision of ~10 at 1,000 workers, bench.placement). So for ClientUpdate and
# TaskFinished.
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


@dataclass(slots=True)  # not frozen: see AssignTask
class ClientUpdate:
    client_id: ClientId
    key: str
    status: TaskStatus
    addresses: tuple[str, ...] = ()
    nbytes: int = 0
    error: ErrorInfo | None = None
    waiting_reason: str = ""
    inline_result: bytes = b""


@dataclass(frozen=True, slots=True)
class DeclareResources:
    """Tell a worker what it now declares (its own books must agree)."""

    worker_id: WorkerId
    resources: Quanta


@dataclass(frozen=True, slots=True)
class TaskAccepted:
    """A new task record, first wanted by ``client_id`` (journal its spec)."""

    key: str
    incarnation: int
    client_id: ClientId
    submission: TaskSubmission


@dataclass(frozen=True, slots=True)
class WantAdded:
    """Another client wants an existing task."""

    client_id: ClientId
    key: str


@dataclass(frozen=True, slots=True)
class WantDropped:
    """A client released (or cancelled) its want of a task."""

    client_id: ClientId
    key: str


@dataclass(frozen=True, slots=True)
class ClientGone:
    """A client left for good; what it alone wanted is already forgotten."""

    client_id: ClientId


@dataclass(frozen=True, slots=True)
class TaskForgotten:
    """The scheduler forgot a task (drop it from the journal)."""

    key: str


@dataclass(frozen=True, slots=True)
class TaskErredFinally:
    """A task erred for good (the journal keeps the error, not a rerun)."""

    key: str
    error: ErrorInfo


#: What the scheduler tells its journal (only when it keeps one).
JournalCommand = (
    TaskAccepted | WantAdded | WantDropped | ClientGone | TaskForgotten | TaskErredFinally
)
JOURNAL_COMMANDS = (
    TaskAccepted,
    WantAdded,
    WantDropped,
    ClientGone,
    TaskForgotten,
    TaskErredFinally,
)

Command = AssignTask | CancelRun | ReleaseData | ClientUpdate | DeclareResources | JournalCommand


@dataclass(slots=True)
class WorkerSnapshot:
    worker_id: WorkerId
    name: str
    address: str
    nthreads: int
    resources: Quanta
    used: Quanta
    running: int
    pid: int = 0
    queued: int = 0


@dataclass(slots=True)
class ClusterSnapshot:
    workers: list[WorkerSnapshot] = field(default_factory=list)
    task_counts: dict[str, int] = field(default_factory=dict)
