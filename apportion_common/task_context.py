"""What a running task can learn about itself (``client_sdk.get_task_context``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TaskContext:
    key: str
    worker_address: str
    worker_name: str
    resources: dict[str, float] = field(default_factory=dict)
    #: the GPUs this task holds, as the machine names them (CUDA_VISIBLE_DEVICES
    #: entries: "1", or a UUID); empty where the worker knows no devices
    gpus: tuple[str, ...] = ()


_current = threading.local()


def set_task_context(context: TaskContext | None) -> None:
    _current.context = context


def get_task_context() -> TaskContext:
    """The context of the task running in this thread.

    Raises ``RuntimeError`` outside a task.
    """
    context: TaskContext | None = getattr(_current, "context", None)
    if context is None:
        raise RuntimeError("get_task_context() was called outside a running task")
    return context
