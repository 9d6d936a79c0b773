"""The apportion client SDK.

>>> from client_sdk import Client, LocalCluster
>>> with LocalCluster(n_workers=2, resources={"GPU": 2}) as cluster, Client(cluster) as client:
...     client.submit(pow, 2, 10, resources={"GPU": 1}).result()
1024

Where things are: ``client`` (the Client facade) hands work to ``_bridge``
(a loop thread for the sync client, the caller's loop for the async one),
which runs ``_core`` (key states, the stream, reconnects, results); task
specs are built in ``_spec``; the network is behind ``_transport`` (a
Protocol, and its gRPC implementation), whose errors ``_grpc_errors`` maps
to the exceptions of ``exceptions``; a task's own error is rebuilt in
``_errors``. ``future``, ``annotate``, ``cluster`` (LocalCluster),
``config`` (``config.set`` for the processes a LocalCluster starts) and
``info`` (the dicts of scheduler_info) are public.
"""

from apportion_common.security import TLS
from apportion_common.task_context import TaskContext, get_task_context

from . import config
from ._dask.capture import install as _capture_dask_annotations
from .annotate import annotate
from .client import Client
from .cluster import LocalCluster
from .exceptions import (
    ApportionError,
    FutureCancelledError,
    KilledWorker,
    MissingDependencyError,
    NoValidWorkerError,
    ResourceSpecError,
    SchedulerConnectionError,
    SerializationError,
    TaskError,
)
from .future import Future
from .progress import progress
from .waiting import as_completed, fire_and_forget, wait

# Keep what dask.annotate asks of dataframes built from now on (dask drops it).
_capture_dask_annotations()

__all__ = [
    "TLS",
    "ApportionError",
    "Client",
    "Future",
    "FutureCancelledError",
    "KilledWorker",
    "LocalCluster",
    "MissingDependencyError",
    "NoValidWorkerError",
    "ResourceSpecError",
    "SchedulerConnectionError",
    "SerializationError",
    "TaskContext",
    "TaskError",
    "annotate",
    "as_completed",
    "config",
    "fire_and_forget",
    "get_task_context",
    "progress",
    "wait",
]
