"""Running one task's code, in a task thread: unpickle, call, pickle. Never raises.

Whatever the task does (raise anything, return something that will not
pickle, arrive as a garbage payload) becomes an :class:`ErrorInfo` naming what
went wrong; the worker carries on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from apportion_common import serialize
from apportion_common.serialize import ErrorInfo, Frames, SerializationError
from apportion_common.shm import Segment
from apportion_common.task_context import TaskContext, set_task_context


@dataclass(slots=True)  # not frozen: one is made per run (see Assignment)
class Outcome:
    """What running a task's code came to."""

    #: the pickled result, or the error it raised (or that getting there raised)
    result: Frames | ErrorInfo
    #: seconds it took (the scheduler sizes queues from it)
    duration: float
    #: where peers on this host map the result from (see shm.publish)
    segment: Segment | None = None


def execute(
    key: str,
    payload: bytes,
    inputs: Mapping[str, Frames],
    context: TaskContext,
) -> Outcome:
    began = time.perf_counter()
    result = _call(key, payload, inputs, context)
    return Outcome(result, time.perf_counter() - began)


def _call(
    key: str, payload: bytes, inputs: Mapping[str, Frames], context: TaskContext
) -> Frames | ErrorInfo:
    try:
        fn, args, kwargs = serialize.loads(payload)
    except BaseException as exc:  # a garbage payload must not kill the worker
        return _wrapped(exc, f"cannot unpickle the function of task {key!r}")
    try:
        if inputs:
            values = {k: serialize.loads(v) for k, v in inputs.items()}
            args = serialize.substitute_inputs(args, values)
            kwargs = serialize.substitute_inputs(kwargs, values)
        set_task_context(context)
        try:
            result = fn(*args, **kwargs)
        finally:
            set_task_context(None)
    except BaseException as exc:  # the task's own error, reported with its type
        return serialize.error_info(exc)
    try:
        return serialize.dumps_result(result)
    except BaseException as exc:
        return _wrapped(
            exc, f"the result of task {key!r} (a {type(result).__qualname__}) cannot be pickled"
        )


def run_function(payload: bytes) -> bytes | ErrorInfo:
    """``client.run``: call a function here, outside the task slots (no lease,
    no task context); its pickled result, or what went wrong."""
    try:
        fn, args, kwargs = serialize.loads(payload)
    except BaseException as exc:  # a garbage payload must not kill the worker
        return _wrapped(exc, "cannot unpickle the function to run")
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the function's own error, reported with its type
        return serialize.error_info(exc)
    try:
        return serialize.dumps(result)
    except BaseException as exc:
        return _wrapped(exc, f"the result (a {type(result).__qualname__}) cannot be pickled")


def _wrapped(exc: BaseException, message: str) -> ErrorInfo:
    wrapper = SerializationError(f"{message}: {type(exc).__name__}: {exc}")
    wrapper.__cause__ = exc
    return serialize.error_info(wrapper)
