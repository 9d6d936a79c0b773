"""Events into the scheduler's state machine: what happened, in the past tense.

Plain data: the servicer turns protobuf messages into events (and the
commands the state machine answers with, :mod:`.commands`, into protobuf
messages), so nothing here knows about gRPC. Timestamps travel inside events
(:class:`Tick`): the state machine never reads a clock. Resource amounts are
fixed-point integers (see :mod:`apportion_common.resources`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from apportion_common.gpus import GpuDevice
from apportion_common.resources import Quanta
from apportion_common.serialize import ErrorInfo

WorkerId = int
ClientId = str


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
    #: run in a child process seeing only its GPUs (the worker's business)
    isolate: bool = False


@dataclass(frozen=True, slots=True)
class WorkerResourcesChanged:
    """An operator changed what a worker declares, while it runs."""

    worker_id: WorkerId
    resources: Quanta
    #: those amounts as the operator wrote them ("100GB"), for status
    resources_text: Mapping[str, str] = field(default_factory=dict)


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
    #: equal for workers that may share memory segments ("" unknown)
    host_id: str = ""
    #: its amounts as the user wrote them ("100GB"), for status
    resources_text: Mapping[str, str] = field(default_factory=dict)
    #: the GPUs it knows it has (GPU=auto), for status only
    gpus: tuple[GpuDevice, ...] = ()
    #: bytes of memory its process may use (0: none): not a resource, for status
    memory_limit: int = 0


@dataclass(frozen=True, slots=True)
class WorkerMemoryReported:
    """A worker's memory as it last measured it. ``paused``: past its pause
    fraction, it starts nothing new, and nothing more is placed there."""

    worker_id: WorkerId
    #: its process's resident bytes
    memory: int
    #: bytes of results it spilled to disk
    spilled_bytes: int
    paused: bool


@dataclass(frozen=True, slots=True)
class GpuUseReported:
    """Which task holds which of a worker's GPUs now (shown, never scheduled on)."""

    worker_id: WorkerId
    #: (device id, keys of the tasks holding it), every device of the worker
    use: tuple[tuple[str, tuple[str, ...]], ...]


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


@dataclass(slots=True)  # not frozen: see commands.AssignTask
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


@dataclass(frozen=True, slots=True)
class TasksForgotten:
    """fire_and_forget: keep these tasks until they end, whatever becomes of
    the client (as if another client wanted each until then)."""

    client_id: ClientId
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RetirementAsked:
    """Retire these workers (an operator, a client, or the worker itself on SIGTERM)."""

    worker_ids: tuple[WorkerId, ...]


@dataclass(frozen=True, slots=True)
class DataReplicated:
    """``worker_id`` took copies of these results (key, nbytes), as asked."""

    worker_id: WorkerId
    acquired: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RestartAsked:
    """Cancel every task and restart every worker process (client.restart())."""


Event = (
    Tick
    | RestartAsked
    | RetirementAsked
    | DataReplicated
    | WorkerJoined
    | GpuUseReported
    | WorkerMemoryReported
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
    | TasksForgotten
)
