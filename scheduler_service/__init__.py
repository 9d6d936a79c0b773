"""The apportion scheduler: a pure state machine behind a grpc.aio servicer."""

from .placement import pick_worker
from .policy import SchedulingPolicy
from .server import SchedulerServer, run_scheduler
from .state import ClusterState, InvariantError

__all__ = [
    "ClusterState",
    "InvariantError",
    "SchedulerServer",
    "SchedulingPolicy",
    "pick_worker",
    "run_scheduler",
]
