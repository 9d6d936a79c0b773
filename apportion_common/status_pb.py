"""The enums of :mod:`apportion_common.status` as ``apportion.v1`` values, both ways.

A value this side does not know (a newer peer's) maps to None, and each
caller decides what that means; nothing here guesses.
"""

from __future__ import annotations

from protos import apportion_pb2 as pb

from .status import ErrorKind, TaskStatus

TASK_STATUS_TO_PB: dict[TaskStatus, pb.TaskStatus.ValueType] = {
    TaskStatus.PENDING: pb.TASK_STATUS_PENDING,
    TaskStatus.FINISHED: pb.TASK_STATUS_FINISHED,
    TaskStatus.ERROR: pb.TASK_STATUS_ERROR,
    TaskStatus.CANCELLED: pb.TASK_STATUS_CANCELLED,
}
TASK_STATUS_FROM_PB: dict[int, TaskStatus] = {v: k for k, v in TASK_STATUS_TO_PB.items()}

ERROR_KIND_TO_PB: dict[ErrorKind, pb.ErrorKind.ValueType] = {
    ErrorKind.TASK: pb.ERROR_KIND_TASK,
    ErrorKind.KILLED_WORKER: pb.ERROR_KIND_KILLED_WORKER,
    ErrorKind.NO_VALID_WORKER: pb.ERROR_KIND_NO_VALID_WORKER,
    ErrorKind.MISSING_DEPENDENCY: pb.ERROR_KIND_MISSING_DEPENDENCY,
    ErrorKind.SCHEDULER_CONNECTION: pb.ERROR_KIND_SCHEDULER_CONNECTION,
    ErrorKind.INVALID_TASK: pb.ERROR_KIND_INVALID_TASK,
}
ERROR_KIND_FROM_PB: dict[int, ErrorKind] = {v: k for k, v in ERROR_KIND_TO_PB.items()}
