"""The apportion worker: runs tasks in threads within its declared resources."""

from .ledger import Ledger
from .state import WorkerState
from .store import ResultStore
from .worker import Worker, run_worker

__all__ = ["Ledger", "ResultStore", "Worker", "WorkerState", "run_worker"]
