"""Protobuf <-> scheduler events and commands. Protobuf stops here.

Everything that arrives is checked before it becomes an event: a message that
cannot be used raises :class:`WireError` naming the field that was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

from apportion.resources import ResourceSpecError, check_resources, from_quanta, to_quanta
from apportion.serialize import ErrorInfo
from protos import apportion_pb2 as pb

from .events import (
    AssignTask,
    ClientUpdate,
    ClusterSnapshot,
    TaskSubmission,
    WorkerSnapshot,
)

MAX_KEY_LENGTH = 1024
MAX_NTHREADS = 100_000

_STATUS_TO_PB = {
    "pending": pb.TASK_STATUS_PENDING,
    "finished": pb.TASK_STATUS_FINISHED,
    "error": pb.TASK_STATUS_ERROR,
    "cancelled": pb.TASK_STATUS_CANCELLED,
}


class WireError(ValueError):
    """A message from a peer that the scheduler cannot use."""


def check_key(key: str, what: str = "task key") -> str:
    if not key:
        raise WireError(f"{what} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise WireError(f"{what} is longer than {MAX_KEY_LENGTH} characters")
    return key


def wire_resources(resources: Mapping[str, float], what: str) -> dict[str, int]:
    try:
        return to_quanta(check_resources(dict(resources)))
    except ResourceSpecError as exc:
        raise WireError(f"{what}: {exc}") from None


def error_from_pb(error: pb.TaskError) -> ErrorInfo:
    return ErrorInfo(
        type_name=error.type_name or "builtins.Exception",
        message=error.message,
        traceback=error.traceback,
        exception=error.exception,
    )


def error_to_pb(error: ErrorInfo) -> pb.TaskError:
    return pb.TaskError(
        type_name=error.type_name,
        message=error.message,
        traceback=error.traceback,
        exception=error.exception,
    )


def submission_from_pb(spec: pb.TaskSpec) -> TaskSubmission:
    key = check_key(spec.key)
    for dep in spec.dependencies:
        check_key(dep, f"dependency of {key!r}")
    return TaskSubmission(
        key=key,
        payload=spec.payload,
        resources=wire_resources(spec.resources, f"task {key!r}"),
        dependencies=tuple(spec.dependencies),
        priority=spec.priority,
        retries=spec.retries,
        workers=tuple(check_key(w, f"worker restriction of {key!r}") for w in spec.workers),
        allow_other_workers=spec.allow_other_workers,
    )


def assignment_to_pb(cmd: AssignTask) -> pb.TaskAssignment:
    return pb.TaskAssignment(
        key=cmd.key,
        run_id=cmd.run_id,
        payload=cmd.payload,
        resources=from_quanta(cmd.resources),
        inputs=[
            pb.InputLocation(key=i.key, addresses=i.addresses, nbytes=i.nbytes) for i in cmd.inputs
        ],
    )


def update_to_pb(cmd: ClientUpdate) -> pb.TaskUpdate:
    update = pb.TaskUpdate(
        key=cmd.key,
        status=_STATUS_TO_PB[cmd.status],
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
    )


def cluster_state_to_pb(address: str, snapshot: ClusterSnapshot) -> pb.ClusterState:
    return pb.ClusterState(
        address=address,
        workers=[worker_info_to_pb(w) for w in snapshot.workers],
        task_counts=snapshot.task_counts,
    )
