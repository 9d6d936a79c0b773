"""``get_task_context()``: what a running task knows about itself."""

from apportion.task_context import TaskContext, get_task_context

__all__ = ["TaskContext", "get_task_context"]
