"""The apportion worker: runs tasks in threads within its declared resources."""

from .ledger import Ledger
from .run import run_worker
from .state import WorkerState
from .store import ResultStore
from .worker import Worker

__all__ = ["Ledger", "ResultStore", "Worker", "WorkerState", "run_worker"]
