"""What the scheduler tells a client about a task, as enums that the wire mirrors.

:class:`TaskStatus` is where a task stands for the clients that want it
(``apportion.v1.TaskStatus``). :class:`ErrorKind` says who raised a task's
error (``apportion.v1.ErrorKind``): the task's own code, or apportion on its
behalf; the client turns each kind into its own exception class in one place
(``client_sdk``), so no service names another's classes.
"""

from __future__ import annotations

import enum


class TaskStatus(enum.StrEnum):
    """A task as its clients see it (str values: they compare equal to the
    strings ``Future.status`` returns)."""

    PENDING = "pending"
    FINISHED = "finished"
    ERROR = "error"
    CANCELLED = "cancelled"


class ErrorKind(enum.Enum):
    """Why a task erred."""

    #: The task's own code raised: the error's type name and pickled exception say what.
    TASK = "task"
    #: It was running on more workers that died than allowed (allowed_failures).
    KILLED_WORKER = "killed-worker"
    #: No connected worker could hold it for no_worker_timeout seconds.
    NO_VALID_WORKER = "no-valid-worker"
    #: An input it names is unknown to the scheduler (released, never submitted).
    MISSING_DEPENDENCY = "missing-dependency"
    #: The scheduler no longer knows it, or the client lost the scheduler.
    SCHEDULER_CONNECTION = "scheduler-connection"
    #: Refused at the wire boundary before it became a task (a bad field).
    INVALID_TASK = "invalid-task"
