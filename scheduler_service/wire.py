"""Protobuf <-> scheduler events and commands. Protobuf stops here.

Everything that arrives is checked before it becomes an event: a message that
cannot be used raises :class:`WireError` naming the field that was wrong (the
limits and the shared checks are in :mod:`apportion_common.boundary`). One pydantic
``TypeAdapter`` per message kind does the checking; see that module for why
and what it costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from google.protobuf.message import DecodeError
from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from apportion_common.boundary import (
    MAX_DEPENDENCIES,
    MAX_ERROR_PICKLE_BYTES,
    MAX_ERROR_TYPE_LENGTH,
    MAX_INLINE_RESULT_BYTES,
    MAX_ITEMS_PER_MESSAGE,
    MAX_KEY_LENGTH,
    MAX_NTHREADS,
    MAX_PAYLOAD_BYTES,
    MAX_WORKER_RESTRICTIONS,
    Address,
    AddressOrEmpty,
    AmountTexts,
    Key,
    Name,
    Resources,
    RunId,
    WireError,
    check,
    check_count,
    check_key,
    cut,
    shorten,
)
from apportion_common.gpus import GpuDevice
from apportion_common.gpus_pb import gpu_from_pb, gpu_to_pb
from apportion_common.resources import from_quanta, matching_spellings, to_quanta
from apportion_common.serialize import ErrorInfo
from apportion_common.status_pb import ERROR_KIND_TO_PB, TASK_STATUS_TO_PB
from protos import apportion_pb2 as pb

from .commands import (
    AssignTask,
    CancelRun,
    Command,
    DeclareResources,
    NotifyClient,
    ReleaseData,
    ReplicateData,
    RestartWorker,
    RetireWorker,
    TellHostPeers,
    UploadFiles,
)
from .events import (
    DataReplicated,
    GpuUseReported,
    TaskErred,
    TaskFinished,
    TaskMissingInputs,
    TaskStarted,
    TaskSubmission,
    WorkerId,
    WorkerMemoryReported,
)
from .inspection import ClusterSnapshot, WorkerSnapshot

__all__ = [
    "MAX_HELD_RESULTS",
    "MAX_ITEMS_PER_MESSAGE",
    "MAX_KEY_LENGTH",
    "MAX_NTHREADS",
    "Registration",
    "WireError",
    "assignment_to_pb",
    "check_count",
    "check_key",
    "check_keys",
    "check_report_counts",
    "client_id_from_pb",
    "cluster_state_to_pb",
    "erred_from_pb",
    "error_from_pb",
    "error_to_pb",
    "finished_from_pb",
    "missing_from_pb",
    "read_message",
    "registration_from_pb",
    "set_resources_from_pb",
    "submission_from_pb",
    "update_to_pb",
    "worker_info_to_pb",
]

#: GPUs one worker may list, and the longest id (a UUID, or a MIG device's).
MAX_GPUS = 1024
MAX_GPU_ID_LENGTH = 128
#: Results a (re)registering worker may say it still holds (RegisterWorker.held).
MAX_HELD_RESULTS = MAX_ITEMS_PER_MESSAGE
_MAX_UINT32 = (1 << 32) - 1
#: A run's reported duration: a year is more than any task runs.
MAX_DURATION_S = 366 * 24 * 3600.0


# ------------------------------------------------------------ message schemas
# Field names are the protobuf ones, so an error names the field as sent.


class _TaskSpec(TypedDict):
    # The payload's size is checked apart: pydantic would copy the bytes.
    key: Key
    resources: Resources
    dependencies: Annotated[tuple[Key, ...], Field(max_length=MAX_DEPENDENCIES)]
    workers: Annotated[tuple[Key, ...], Field(max_length=MAX_WORKER_RESTRICTIONS)]


class _RegisterWorker(TypedDict):
    name: Name
    address: Address
    nthreads: Annotated[int, Field(ge=1, le=MAX_NTHREADS)]
    resources: Resources
    host_id: Name
    declared_text: AmountTexts


class _GpuDevice(TypedDict):
    id: Annotated[str, Field(min_length=1, max_length=MAX_GPU_ID_LENGTH)]
    uuid: Annotated[str, Field(max_length=MAX_GPU_ID_LENGTH)]
    name: Name


class _HeldResult(TypedDict):
    key: Key


class _RunRef(TypedDict):
    key: Key
    run_id: RunId


class _MissingInput(TypedDict):
    key: Key
    address: AddressOrEmpty


class _SetWorkerResources(TypedDict):
    worker: Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH)]
    resources: Resources
    resources_text: AmountTexts


_TASK_SPEC = TypeAdapter(_TaskSpec)
_REGISTER = TypeAdapter(_RegisterWorker)
_GPUS = TypeAdapter(Annotated[list[_GpuDevice], Field(max_length=MAX_GPUS)])
_HELD = TypeAdapter(Annotated[list[_HeldResult], Field(max_length=MAX_HELD_RESULTS)])
_RUN_REF = TypeAdapter(_RunRef)
_MISSING = TypeAdapter(Annotated[list[_MissingInput], Field(max_length=MAX_DEPENDENCIES)])
_SET_RESOURCES = TypeAdapter(_SetWorkerResources)
_KEYS = TypeAdapter(Annotated[tuple[Key, ...], Field(max_length=MAX_ITEMS_PER_MESSAGE)])
_CLIENT_ID = TypeAdapter(Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH)])

# ------------------------------------------------------------------- inbound


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    address: str
    nthreads: int
    resources: dict[str, int]
    host_id: str = ""
    #: the amounts as the user wrote them ("100GB"), for status
    resources_text: dict[str, str] = field(default_factory=dict)
    #: its GPUs where it knows them (GPU=auto), for status
    gpus: tuple[GpuDevice, ...] = ()
    #: bytes of memory its process may use (0: none), for status
    memory_limit: int = 0


def registration_from_pb(reg: pb.RegisterWorker) -> Registration:
    what = f"RegisterWorker from {shorten(reg.name or reg.address or 'a worker')}"
    checked = check(
        _REGISTER,
        {
            "name": reg.name,
            "address": reg.address,
            "nthreads": reg.nthreads,
            "resources": dict(reg.resources),
            "host_id": reg.host_id,
            "declared_text": dict(reg.declared_text),
        },
        what,
    )
    check(_HELD, [{"key": h.key} for h in reg.held], f"{what}: held")
    check(_GPUS, [{"id": g.id, "uuid": g.uuid, "name": g.name} for g in reg.gpus], f"{what}: gpus")
    gpus = tuple(gpu_from_pb(g) for g in reg.gpus)
    if len({g.id for g in gpus}) != len(gpus):
        raise WireError(f"{what}: gpus: a device id is listed twice")
    return Registration(
        name=checked["name"] or checked["address"],
        address=checked["address"],
        nthreads=checked["nthreads"],
        resources=to_quanta(checked["resources"]),
        host_id=checked["host_id"],
        resources_text=_texts(
            checked["resources"], checked["declared_text"], f"{what}: declared_text"
        ),
        gpus=gpus,
        memory_limit=reg.memory_limit,
    )


def _texts(amounts: dict[str, float], texts: dict[str, str], what: str) -> dict[str, str]:
    """The amounts as written, each checked to read as its amount (a status
    must not show 100GB for what is accounted as 7e10); zero amounts, which
    are not declared, drop theirs."""
    readable = matching_spellings(amounts, texts)
    for name, text in texts.items():
        if name not in readable:
            where = f"{what}[{shorten(name, 40)!r}]"
            if name not in amounts:
                raise WireError(f"{where}: no amount of that resource is declared")
            raise WireError(
                f"{where}: {shorten(text, 40)!r} does not read as the amount "
                f"declared ({amounts[name]!r})"
            )
    return {name: text for name, text in readable.items() if amounts[name]}


def submission_from_pb(spec: pb.TaskSpec) -> TaskSubmission:
    what = f"task {shorten(spec.key)!r}"
    checked = check(
        _TASK_SPEC,
        {
            "key": spec.key,
            "resources": dict(spec.resources),
            "dependencies": tuple(spec.dependencies),
            "workers": tuple(spec.workers),
        },
        what,
    )
    payload = spec.payload
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(
            f"{what}: payload: {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES} "
            "(pass large data as the result of another task)"
        )
    return TaskSubmission(
        key=checked["key"],
        payload=payload,
        resources=to_quanta(checked["resources"]),
        dependencies=checked["dependencies"],
        priority=spec.priority,
        retries=spec.retries,
        workers=checked["workers"],
        allow_other_workers=spec.allow_other_workers,
        isolate=spec.isolate,
    )


def client_id_from_pb(hello: pb.ClientHello) -> tuple[str, tuple[str, ...]]:
    """The client's id and the keys it resumes (ClientHello.resume_keys)."""
    client_id = check(_CLIENT_ID, hello.client_id, "ClientHello.client_id")
    if client_id.startswith("<"):
        # Ids in angle brackets are the scheduler's own (fire_and_forget's).
        raise WireError(f"ClientHello.client_id {client_id!r} is reserved (it starts with '<')")
    return client_id, check_keys(hello.resume_keys, "ClientHello.resume_keys")


def check_keys(keys: Iterable[str], what: str) -> tuple[str, ...]:
    """A KeyList's keys (cancel, release), each a usable key."""
    return check(_KEYS, tuple(keys), what)


async def read_message(context: Any) -> object:
    """``context.read()``, with bytes that do not parse as the expected message
    turned into a :class:`WireError` (gRPC would answer UNKNOWN otherwise)."""
    try:
        return await context.read()
    except DecodeError as exc:
        raise WireError(f"the message could not be parsed: {exc}") from None


def finished_from_pb(worker_id: WorkerId, done: pb.TaskFinished, what: str) -> TaskFinished:
    """Plain checks rather than a TypeAdapter: every task ends with one of
    these (see the module docstring of :mod:`apportion_common.boundary` for the cost)."""
    key = done.key
    run_id = done.run_id
    inline_result = done.inline_result
    duration = done.duration_s
    if (
        0 < len(key) <= MAX_KEY_LENGTH
        and run_id >= 1
        and len(inline_result) <= MAX_INLINE_RESULT_BYTES
        and 0.0 <= duration <= MAX_DURATION_S  # NaN fails this too
        and not done.fetched_keys
        and not done.fetched_nbytes
    ):
        # The common case, checked in one go: no inputs fetched from peers.
        return TaskFinished(worker_id, key, run_id, done.nbytes, (), inline_result, duration)
    fetched_keys = tuple(done.fetched_keys)
    problem = _key_problem(key, "key")
    if problem is None and done.run_id < 1:
        problem = "run_id: must be 1 or more"
    if problem is None and len(done.inline_result) > MAX_INLINE_RESULT_BYTES:
        problem = (
            f"inline_result: {len(done.inline_result)} bytes; "
            f"at most {MAX_INLINE_RESULT_BYTES} travel inline"
        )
    if problem is None and len(fetched_keys) > MAX_DEPENDENCIES:
        problem = f"fetched_keys: {len(fetched_keys)} items; at most {MAX_DEPENDENCIES}"
    if problem is None:
        for i, fetched in enumerate(fetched_keys):
            if (problem := _key_problem(fetched, f"fetched_keys[{i}]")) is not None:
                break
    if problem is None and len(done.fetched_nbytes) != len(fetched_keys):
        problem = (
            f"fetched_keys has {len(fetched_keys)} items but fetched_nbytes "
            f"{len(done.fetched_nbytes)}; they must be parallel lists"
        )
    if problem is None and key in fetched_keys:
        problem = "fetched_keys names the finished task itself"
    if problem is None and not 0.0 <= duration <= MAX_DURATION_S:
        problem = (
            f"duration_s: {duration!r}; must be a number of seconds from 0 to {MAX_DURATION_S:g}"
        )
    if problem is not None:
        raise WireError(f"{what}: {problem}")
    return TaskFinished(
        worker_id,
        key,
        done.run_id,
        done.nbytes,
        tuple(zip(fetched_keys, done.fetched_nbytes, strict=True)),
        done.inline_result,
        duration,
    )


def _key_problem(key: str, field: str) -> str | None:
    if not key:
        return f"{field}: is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"{field}: is longer than {MAX_KEY_LENGTH} characters ({len(key)})"
    return None


def erred_from_pb(worker_id: WorkerId, failed: pb.TaskFailed, what: str) -> TaskErred:
    ref = check(_RUN_REF, {"key": failed.key, "run_id": failed.run_id}, what)
    return TaskErred(worker_id, ref["key"], ref["run_id"], error_from_pb(failed.error))


def missing_from_pb(
    worker_id: WorkerId, missing: pb.TaskMissingInputs, what: str
) -> TaskMissingInputs:
    ref = check(_RUN_REF, {"key": missing.key, "run_id": missing.run_id}, what)
    inputs = check(
        _MISSING, [{"key": i.key, "address": i.address} for i in missing.inputs], f"{what}: inputs"
    )
    pairs = tuple((i["key"], i["address"]) for i in inputs)
    return TaskMissingInputs(worker_id, ref["key"], ref["run_id"], pairs)


def started_from_pb(worker_id: WorkerId, ref: pb.RunRef, what: str) -> TaskStarted:
    key, run_id = ref.key, ref.run_id
    if 0 < len(key) <= MAX_KEY_LENGTH and run_id >= 1:
        return TaskStarted(worker_id, key, run_id)
    problem = _key_problem(key, "key") or "run_id: must be 1 or more"
    raise WireError(f"{what}: {problem}")


def check_report_counts(reports: pb.WorkerReports) -> None:
    for name in ("finished", "failed", "missing_inputs", "started", "acquired"):
        check_count(getattr(reports, name), MAX_ITEMS_PER_MESSAGE, f"WorkerReports.{name}")


def acquired_from_pb(worker_id: WorkerId, reports: pb.WorkerReports) -> DataReplicated | None:
    """The copies a worker took as asked (see Retirements), checked; None if none."""
    if not reports.acquired:
        return None
    acquired = tuple(
        (check_key(held.key, f"WorkerReports.acquired[{i}].key"), held.nbytes)
        for i, held in enumerate(reports.acquired)
    )
    return DataReplicated(worker_id, acquired)


def gpu_use_from_pb(worker_id: WorkerId, reports: pb.WorkerReports) -> GpuUseReported | None:
    """Which task holds which GPU, if the batch says (checked); None if not."""
    if not reports.gpu_use_sent:
        return None
    check_count(reports.gpu_use, MAX_GPUS, "WorkerReports.gpu_use")
    use = []
    for i, item in enumerate(reports.gpu_use):
        what = f"WorkerReports.gpu_use[{i}]"
        if not 0 < len(item.device) <= MAX_GPU_ID_LENGTH:
            raise WireError(f"{what}.device: 1 to {MAX_GPU_ID_LENGTH} characters")
        check_count(item.keys, MAX_ITEMS_PER_MESSAGE, f"{what}.keys")
        keys = tuple(check_key(k, f"{what}.keys[{j}]") for j, k in enumerate(item.keys))
        use.append((item.device, keys))
    return GpuUseReported(worker_id, tuple(use))


def memory_from_pb(worker_id: WorkerId, reports: pb.WorkerReports) -> WorkerMemoryReported | None:
    """The worker's memory figures, if the batch carries them (None if not)."""
    if not reports.HasField("memory"):
        return None
    m = reports.memory
    return WorkerMemoryReported(worker_id, m.process_bytes, m.spilled_bytes, m.paused)


def retire_workers_from_pb(request: pb.RetireWorkersRequest) -> tuple[list[str], float]:
    """(names or addresses, timeout in seconds) of a RetireWorkers call."""
    check_count(request.workers, MAX_ITEMS_PER_MESSAGE, "RetireWorkersRequest.workers")
    if not request.workers:
        raise WireError("RetireWorkersRequest.workers: name at least one worker")
    workers = [
        check_key(w, f"RetireWorkersRequest.workers[{i}]") for i, w in enumerate(request.workers)
    ]
    timeout = request.timeout_s
    if not (math.isfinite(timeout) and timeout >= 0):
        raise WireError(f"RetireWorkersRequest.timeout_s must be >= 0 seconds, not {timeout}")
    return workers, timeout or DEFAULT_RETIRE_TIMEOUT_S


#: How long RetireWorkers waits when the caller names no timeout.
DEFAULT_RETIRE_TIMEOUT_S = 60.0


def set_resources_from_pb(
    request: pb.SetWorkerResourcesRequest,
) -> tuple[str, dict[str, int], dict[str, str]]:
    """The worker's address or name, what it declares from now, and those
    amounts as written."""
    what = "SetWorkerResourcesRequest"
    checked = check(
        _SET_RESOURCES,
        {
            "worker": request.worker,
            "resources": dict(request.resources),
            "resources_text": dict(request.resources_text),
        },
        what,
    )
    amounts = checked["resources"]
    texts = _texts(amounts, checked["resources_text"], f"{what}.resources_text")
    return checked["worker"], to_quanta(amounts), texts


def error_from_pb(error: pb.TaskError) -> ErrorInfo:
    """A worker's report of a task's exception. Over-long text is cut, not
    refused: a user's exception may carry a huge message, and refusing it
    would close the worker's stream over the user's bug. A worker reports
    only what task code raised: its kind is always TASK."""
    return ErrorInfo(
        type_name=cut(error.type_name, MAX_ERROR_TYPE_LENGTH) or "builtins.Exception",
        message=cut(error.message),
        traceback=cut(error.traceback, keep_end=True),  # the end says where it raised
        exception=error.exception if len(error.exception) <= MAX_ERROR_PICKLE_BYTES else b"",
    )


# ------------------------------------------------------------------ outbound


def error_to_pb(error: ErrorInfo) -> pb.TaskError:
    return pb.TaskError(
        type_name=error.type_name,
        message=error.message,
        traceback=error.traceback,
        exception=error.exception,
        kind=ERROR_KIND_TO_PB[error.kind],
    )


def assignment_to_pb(cmd: AssignTask) -> pb.TaskAssignment:
    return pb.TaskAssignment(
        key=cmd.key,
        run_id=cmd.run_id,
        payload=cmd.payload,
        resources=from_quanta(cmd.resources),
        inputs=[
            pb.InputLocation(
                key=i.key, addresses=i.addresses, nbytes=i.nbytes, same_host=i.same_host
            )
            for i in cmd.inputs
        ],
        incarnation=cmd.incarnation,
        queued=cmd.queued,
        priority=cmd.priority,
        depth=min(cmd.depth, _MAX_UINT32),
        isolate=cmd.isolate,
    )


def update_to_pb(cmd: NotifyClient) -> pb.TaskUpdate:
    update = pb.TaskUpdate(
        key=cmd.key,
        status=TASK_STATUS_TO_PB[cmd.status],
        addresses=cmd.addresses,
        nbytes=cmd.nbytes,
        waiting_reason=cmd.waiting_reason,
        inline_result=cmd.inline_result,
    )
    if cmd.error is not None:
        update.error.CopyFrom(error_to_pb(cmd.error))
    return update


def worker_info_to_pb(w: WorkerSnapshot) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=w.worker_id,
        name=w.name,
        address=w.address,
        nthreads=w.nthreads,
        resources=from_quanta(w.resources),
        used_resources=from_quanta(w.used),
        running=w.running,
        pid=w.pid,
        queued=w.queued,
        draining=w.draining,
        resources_text=w.resources_text,
        gpus=[gpu_to_pb(g) for g in w.gpus],
        gpu_use=[pb.GpuUse(device=d, keys=keys) for d, keys in w.gpu_use.items()],
        memory_limit=w.memory_limit,
        memory=w.memory,
        spilled_bytes=w.spilled_bytes,
        paused=w.paused,
    )


def cluster_state_to_pb(
    address: str, snapshot: ClusterSnapshot, dashboard_address: str = ""
) -> pb.ClusterState:
    return pb.ClusterState(
        address=address,
        workers=[worker_info_to_pb(w) for w in snapshot.workers],
        task_counts=snapshot.task_counts,
        dashboard_address=dashboard_address,
    )


def worker_batch_to_pb(cmds: list[Command]) -> pb.SchedulerToWorker:
    """The commands for one worker, as one WorkerInstructions message."""
    instructions = pb.WorkerInstructions()
    for cmd in cmds:
        if isinstance(cmd, AssignTask):
            instructions.assign.append(assignment_to_pb(cmd))
        elif isinstance(cmd, CancelRun):
            instructions.cancel.append(pb.RunRef(key=cmd.key, run_id=cmd.run_id))
        elif isinstance(cmd, ReleaseData):
            instructions.release.append(pb.RunRef(key=cmd.key, run_id=cmd.run_id))
        elif isinstance(cmd, DeclareResources):
            # Present even when empty: a worker told to declare nothing must
            # hear it (an empty map alone would leave the field unset).
            instructions.declared.SetInParent()
            instructions.declared.amounts.update(from_quanta(cmd.resources))
        elif isinstance(cmd, TellHostPeers):
            instructions.host_peers = cmd.count
        elif isinstance(cmd, ReplicateData):
            location = cmd.location
            instructions.replicate.add(
                key=location.key, addresses=location.addresses, nbytes=location.nbytes
            )
        elif isinstance(cmd, RetireWorker):
            instructions.retire = True
        elif isinstance(cmd, RestartWorker):
            instructions.restart = True
        elif isinstance(cmd, UploadFiles):
            for filename, data in cmd.files:
                instructions.files.add(filename=filename, data=data)
    return pb.SchedulerToWorker(instructions=instructions)
