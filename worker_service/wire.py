"""Protobuf <-> the worker's own data. Protobuf stops here.

Instructions from the scheduler are checked (:mod:`apportion_common.boundary`)
and become :class:`~worker_service.assignment.Assignment` s; the worker's
reports (:class:`Reports`) become one ``WorkerReports`` message per write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apportion_common import boundary
from apportion_common.gpus import GpuDevice
from apportion_common.gpus_pb import gpu_to_pb
from apportion_common.locations import InputLocation
from apportion_common.resources import to_quanta
from apportion_common.serialize import ErrorInfo
from protos import apportion_pb2 as pb

from .assignment import Assignment

log = logging.getLogger("worker_service")


def assignment_from_pb(a: pb.TaskAssignment, what: str) -> Assignment:
    """Raise :class:`~apportion_common.boundary.WireError` if ``a`` is unusable."""
    boundary.check_assignment(a, what)
    resources = dict(a.resources)
    return Assignment(
        key=a.key,
        run_id=a.run_id,
        payload=a.payload,
        resources=resources,
        need=to_quanta(resources),
        inputs=tuple(_input_from_pb(i) for i in a.inputs)
        if a.inputs
        else (),  # most runs have none: no generator to build and run
        incarnation=a.incarnation,
        queued=a.queued,
        priority=a.priority,
        depth=a.depth,
        isolate=a.isolate,
    )


@dataclass(frozen=True, slots=True)
class Malformed:
    """An assignment that could not be used, and why. ``key`` and ``run_id``
    are set when still usable: reporting its failure then lets the scheduler
    free the run's lease and tell the submitter."""

    reason: str
    key: str = ""
    run_id: int = 0


@dataclass(frozen=True, slots=True)
class Instructions:
    """One batch from the scheduler, checked, in the order to apply it."""

    #: what the worker declares from now (set-resources), if the batch says
    declared: dict[str, float] | None
    #: why a declaration in the batch was refused
    declared_refused: str
    #: (key, run id) of results to drop (run id 0: whatever is stored)
    release: list[tuple[str, int]]
    #: run ids cancelled
    cancel: list[int]
    assign: list[Assignment | Malformed]
    #: how many other workers share this host, if the batch says
    host_peers: int | None = None
    #: results to take a copy of (a retiring worker hands them over)
    replicate: list[InputLocation] = field(default_factory=list)
    #: drained: close and exit
    retire: bool = False
    #: (filename, contents) of files for tasks to import
    files: list[tuple[str, bytes]] = field(default_factory=list)
    #: exit for the nanny to start this process afresh
    restart: bool = False


def instructions_from_pb(batch: pb.WorkerInstructions) -> Instructions:
    declared, refused = None, ""
    if batch.HasField("declared"):
        try:
            declared = boundary.check_amounts(batch.declared.amounts, "WorkerInstructions.declared")
        except boundary.WireError as exc:
            refused = str(exc)
    assign: list[Assignment | Malformed] = []
    for i, raw in enumerate(batch.assign):
        try:
            assign.append(assignment_from_pb(raw, f"WorkerInstructions.assign[{i}]"))
        except boundary.WireError as exc:
            usable = raw.run_id >= 1 and 0 < len(raw.key) <= boundary.MAX_KEY_LENGTH
            assign.append(
                Malformed(str(exc), raw.key, raw.run_id) if usable else Malformed(str(exc))
            )
    return Instructions(
        declared,
        refused,
        [(ref.key, ref.run_id) for ref in batch.release],
        [ref.run_id for ref in batch.cancel],
        assign,
        batch.host_peers if batch.HasField("host_peers") else None,
        _replications(batch),
        batch.retire,
        [(f.filename, f.data) for f in batch.files],
        batch.restart,
    )


def _replications(batch: pb.WorkerInstructions) -> list[InputLocation]:
    """The usable ones: a bad key or no address is logged and skipped."""
    usable = []
    for i, item in enumerate(batch.replicate):
        try:
            boundary.check_key(item.key, f"WorkerInstructions.replicate[{i}].key")
        except boundary.WireError as exc:
            log.error("ignoring a replication from the scheduler: %s", exc)
            continue
        if item.addresses:
            usable.append(_input_from_pb(item))
    return usable


@dataclass(slots=True)  # not frozen: one is made per run (see Assignment)
class Finished:
    key: str
    run_id: int
    nbytes: int
    #: (key, nbytes) of inputs fetched from peers for it, now held here too
    fetched: list[tuple[str, int]]
    #: the pickled result itself, when small enough to travel with the report
    inline_result: bytes
    #: seconds its code ran
    duration: float


@dataclass(frozen=True, slots=True)
class Failed:
    key: str
    run_id: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class MissingInputs:
    key: str
    run_id: int
    #: (input key, the address it could not be fetched from; "" for none)
    missing: list[tuple[str, str]]


@dataclass(slots=True)
class Reports:
    """What the worker has to tell the scheduler, in the order it happened
    within each kind (the scheduler applies ends before starts)."""

    finished: list[Finished] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    missing: list[MissingInputs] = field(default_factory=list)
    #: (key, run id) of queued runs that took their lease and began
    started: list[tuple[str, int]] = field(default_factory=list)
    heartbeat: bool = False
    #: (key, nbytes) of copies taken as the scheduler asked
    acquired: list[tuple[str, int]] = field(default_factory=list)
    #: ask the scheduler to drain and retire this worker
    retire_me: bool = False
    #: which task holds which GPU now (device id -> keys), when that changed
    gpu_use: dict[str, list[str]] | None = None
    #: (resident bytes, spilled bytes, paused), as last measured
    memory: tuple[int, int, bool] | None = None

    def __bool__(self) -> bool:
        return bool(
            self.finished
            or self.failed
            or self.missing
            or self.started
            or self.heartbeat
            or self.acquired
            or self.retire_me
            or self.gpu_use is not None
            or self.memory is not None
        )


def reports_to_pb(reports: Reports) -> pb.WorkerToScheduler:
    # Only the kinds a batch holds (most hold one or two): no empty list made.
    fields: dict[str, Any] = {"heartbeat": reports.heartbeat}
    if reports.finished:
        fields["finished"] = [_finished_pb(f) for f in reports.finished]
    if reports.failed:
        fields["failed"] = [
            pb.TaskFailed(
                key=f.key,
                run_id=f.run_id,
                error=error_to_pb(f.error),
            )
            for f in reports.failed
        ]
    if reports.missing:
        fields["missing_inputs"] = [
            pb.TaskMissingInputs(
                key=m.key,
                run_id=m.run_id,
                inputs=[pb.MissingInput(key=k, address=addr) for k, addr in m.missing],
            )
            for m in reports.missing
        ]
    if reports.started:
        fields["started"] = [pb.RunRef(key=key, run_id=run_id) for key, run_id in reports.started]
    if reports.acquired:
        fields["acquired"] = [pb.HeldResult(key=k, nbytes=n) for k, n in reports.acquired]
    if reports.retire_me:
        fields["retire_me"] = True
    if reports.gpu_use is not None:
        fields["gpu_use_sent"] = True
        fields["gpu_use"] = [
            pb.GpuUse(device=device, keys=keys) for device, keys in reports.gpu_use.items()
        ]
    if reports.memory is not None:
        process, spilled, paused = reports.memory
        fields["memory"] = pb.WorkerMemory(
            process_bytes=process, spilled_bytes=spilled, paused=paused
        )
    return pb.WorkerToScheduler(reports=pb.WorkerReports(**fields))


def _finished_pb(f: Finished) -> pb.TaskFinished:
    if f.fetched:
        return pb.TaskFinished(
            key=f.key,
            run_id=f.run_id,
            nbytes=f.nbytes,
            fetched_keys=[k for k, _ in f.fetched],
            fetched_nbytes=[n for _, n in f.fetched],
            inline_result=f.inline_result,
            duration_s=f.duration,
        )
    return pb.TaskFinished(
        key=f.key,
        run_id=f.run_id,
        nbytes=f.nbytes,
        inline_result=f.inline_result,
        duration_s=f.duration,
    )


def error_to_pb(error: ErrorInfo) -> pb.TaskError:
    return pb.TaskError(
        type_name=error.type_name,
        message=error.message,
        traceback=error.traceback,
        exception=error.exception,
    )


def _input_from_pb(i: pb.InputLocation) -> InputLocation:
    addresses = tuple(i.addresses)
    # A flag list that does not match the addresses is ignored: gRPC then.
    same_host = tuple(i.same_host) if len(i.same_host) == len(addresses) else ()
    return InputLocation(i.key, addresses, i.nbytes, same_host)


def registration_to_pb(
    name: str,
    address: str,
    nthreads: int,
    resources: dict[str, float],
    pid: int,
    held: list[tuple[str, int, int]],
    host_id: str = "",
    resources_text: dict[str, str] | None = None,
    gpus: Sequence[GpuDevice] = (),
    memory_limit: int = 0,
) -> pb.WorkerToScheduler:
    return pb.WorkerToScheduler(
        register=pb.RegisterWorker(
            name=name,
            address=address,
            nthreads=nthreads,
            resources=resources,
            pid=pid,
            held=[
                pb.HeldResult(key=key, incarnation=incarnation, nbytes=nbytes)
                for key, incarnation, nbytes in held
            ],
            host_id=host_id,
            declared_text=resources_text,
            gpus=[gpu_to_pb(g) for g in gpus],
            memory_limit=memory_limit,
        )
    )
