"""A run as the scheduler assigned it to this worker, in plain data.

``worker_service.wire`` makes these from protobuf at the stream; everything
else in the worker works on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from apportion_common.locations import InputLocation
from apportion_common.resources import Quanta


# Not frozen, though never changed: one is made per run, and a frozen
# dataclass's __init__ sets each field through object.__setattr__, a cost
# that shows against a short task's. So for the worker's other per-run records.
@dataclass(slots=True)
class Assignment:
    key: str
    run_id: int
    #: cloudpickle of (function, args, kwargs); futures inside are InputRefs
    payload: bytes
    #: what the task needs, as the user wrote it (its TaskContext.resources)
    resources: dict[str, float]
    #: the same in fixed point: what its lease holds in the ledger
    need: Quanta
    inputs: tuple[InputLocation, ...]
    #: names the task across scheduler restarts (see HeldResult)
    incarnation: int = 0
    #: to the queue: it holds nothing until this worker starts it
    queued: bool = False
    #: the scheduler's order among queued runs: highest priority, then deepest
    priority: int = 0
    depth: int = 0
    #: run in a child process that sees only its GPUs (submit(isolate=True))
    isolate: bool = False
    #: the GPUs this run holds here, once the worker has given it some
    gpus: tuple[str, ...] = ()
