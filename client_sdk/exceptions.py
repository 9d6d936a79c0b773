"""Exceptions raised by the client SDK.

The tree, drawn once::

    Exception
    ├── ApportionError                      anything apportion itself raises
    │   ├── TaskError                       a task raised an exception whose type
    │   │                                   could not be rebuilt here
    │   ├── MissingDependencyError          a task's input is unknown to the scheduler
    │   ├── KilledWorker                    a task was running on too many workers
    │   │                                   that died (allowed_failures)
    │   ├── NoValidWorkerError              no connected worker could hold a task
    │   │                                   for no_worker_timeout seconds
    │   └── SchedulerConnectionError        the scheduler could not be reached / went away
    ├── concurrent.futures.CancelledError
    │   └── FutureCancelledError (also ApportionError)   the task was cancelled
    ├── TypeError
    │   └── SerializationError              a function, argument or result won't pickle
    └── ValueError
        └── ResourceSpecError               a bad resource name or amount

A task's own exception is raised again by ``Future.result()`` with its own
type, and the remote traceback attached as a note.
"""

from __future__ import annotations

import concurrent.futures

from apportion_common.resources import ResourceSpecError
from apportion_common.serialize import SerializationError


class ApportionError(Exception):
    pass


class TaskError(ApportionError):
    """A remote exception whose type could not be rebuilt in this process."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message


class MissingDependencyError(ApportionError):
    pass


class KilledWorker(ApportionError):
    """The task was running on more workers that died than allowed_failures."""


class NoValidWorkerError(ApportionError):
    """No connected worker could hold the task within no_worker_timeout."""


class SchedulerConnectionError(ApportionError, ConnectionError):
    pass


class FutureCancelledError(ApportionError, concurrent.futures.CancelledError):
    def __init__(self, key: str) -> None:
        super().__init__(f"task {key!r} was cancelled")
        self.key = key


__all__ = [
    "ApportionError",
    "FutureCancelledError",
    "KilledWorker",
    "MissingDependencyError",
    "NoValidWorkerError",
    "ResourceSpecError",
    "SchedulerConnectionError",
    "SerializationError",
    "TaskError",
]
