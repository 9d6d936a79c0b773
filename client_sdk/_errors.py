"""A task's remote error, turned back into an exception: the one place that
maps what the scheduler says (an :class:`~apportion_common.status.ErrorKind`)
to the SDK's exception classes. (A failed gRPC *call* is mapped in
:mod:`client_sdk._grpc_errors`.)"""

from __future__ import annotations

import builtins
import importlib

from apportion_common import serialize
from apportion_common.status import ErrorKind

from .exceptions import (
    KilledWorker,
    MissingDependencyError,
    NoValidWorkerError,
    SchedulerConnectionError,
    TaskError,
)

#: Errors apportion raised on a task's behalf, by kind (ErrorKind.TASK is the
#: task's own: rebuilt from the pickled exception or its type's name).
_RAISED_BY_APPORTION: dict[ErrorKind, type[Exception]] = {
    ErrorKind.KILLED_WORKER: KilledWorker,
    ErrorKind.NO_VALID_WORKER: NoValidWorkerError,
    ErrorKind.MISSING_DEPENDENCY: MissingDependencyError,
    ErrorKind.SCHEDULER_CONNECTION: SchedulerConnectionError,
    ErrorKind.INVALID_TASK: ValueError,
}


def _find_type(type_name: str) -> type[BaseException] | None:
    module_name, _, qualname = type_name.rpartition(".")
    try:
        module = builtins if module_name == "builtins" else importlib.import_module(module_name)
        obj: object = module
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def rebuild_exception(error: serialize.ErrorInfo) -> BaseException:
    own = _RAISED_BY_APPORTION.get(error.kind)
    if own is not None:
        return own(error.message)
    exc: BaseException | None = None
    if error.exception:
        try:
            loaded = serialize.loads(error.exception)
            if isinstance(loaded, BaseException):
                exc = loaded
        except Exception:
            exc = None
    if exc is None:
        kind = _find_type(error.type_name)
        try:
            exc = kind(error.message) if kind is not None else None
        except Exception:
            exc = None
    if exc is None:
        exc = TaskError(error.type_name, error.message)
    if error.traceback:
        exc.add_note("Remote traceback (most recent call last, on the worker):\n" + error.traceback)
    return exc
