"""Turning a task's remote error back into an exception of the same type."""

from __future__ import annotations

import builtins
import importlib

from apportion import serialize

from .exceptions import MissingDependencyError, TaskError


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
    exc: BaseException | None = None
    if error.exception:
        try:
            loaded = serialize.loads(error.exception)
            if isinstance(loaded, BaseException):
                exc = loaded
        except Exception:
            exc = None
    if exc is None:
        if error.type_name == "client_sdk.exceptions.MissingDependencyError":
            exc = MissingDependencyError(error.message)
        else:
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
