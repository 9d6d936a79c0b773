"""The one place where task functions, arguments, results and errors are pickled.

Futures inside a task's arguments travel as :class:`InputRef` placeholders;
the worker swaps each for the value of that input before it calls the function.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle


class SerializationError(TypeError):
    """A function, argument or result that cannot be pickled."""


@dataclass(frozen=True, slots=True)
class InputRef:
    """Stands in for the result of task ``key`` inside a task's arguments."""

    key: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception raised by a task, in a form that survives the wire."""

    type_name: str
    message: str
    traceback: str
    exception: bytes  # cloudpickled exception, or b"" when it would not pickle


def dumps(obj: object) -> bytes:
    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def loads(data: bytes | bytearray | memoryview) -> Any:
    return pickle.loads(data)


def dump_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    try:
        return dumps((fn, args, kwargs))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(
            f"cannot pickle task {name!r} with its arguments: {type(exc).__name__}: {exc}"
        ) from exc


def substitute_inputs(obj: Any, values: Mapping[str, Any]) -> Any:
    """Replace every :class:`InputRef` in nested lists, tuples, sets and dicts."""
    if isinstance(obj, InputRef):
        return values[obj.key]
    if type(obj) is list:
        return [substitute_inputs(x, values) for x in obj]
    if type(obj) is tuple:
        return tuple(substitute_inputs(x, values) for x in obj)
    if type(obj) is dict:
        return {k: substitute_inputs(v, values) for k, v in obj.items()}
    if type(obj) in (set, frozenset):
        return type(obj)(substitute_inputs(x, values) for x in obj)
    return obj


def error_info(exc: BaseException) -> ErrorInfo:
    tb = "".join(traceback.format_exception(exc))
    try:
        pickled = dumps(exc)
        loads(pickled)  # an exception that pickles but will not unpickle is no use
    except Exception:
        pickled = b""
    return ErrorInfo(
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        traceback=tb,
        exception=pickled,
    )
