"""The scheduler's view of the cluster as plain dicts.

:func:`cluster_info` turns the scheduler's ``GetClusterState`` reply into what
``Client.scheduler_info()`` returns and ``apportion status --json`` prints;
:func:`worker_info` is one worker's entry, as ``Client.set_resources()``
returns it. The shapes are :class:`ClusterInfo` and :class:`WorkerInfo`.
"""

from __future__ import annotations

from typing import TypedDict

from protos import apportion_pb2 as pb


class GpuInfo(TypedDict):
    #: the device as CUDA_VISIBLE_DEVICES names it on that worker ("1", a UUID)
    id: str
    index: int
    uuid: str
    name: str
    #: bytes
    memory: int
    #: keys of the tasks holding it now
    tasks: list[str]


class WorkerInfo(TypedDict):
    name: str
    nthreads: int
    resources: dict[str, float]
    used_resources: dict[str, float]
    #: tasks running there now
    running: int
    #: tasks queued there, holding nothing yet
    queued: int
    #: being retired: nothing new goes there, it exits once drained
    draining: bool
    #: the amounts of ``resources`` as written where they were written as
    #: text (``{"MEMORY": "100GB"}``); the others have none
    resources_text: dict[str, str]
    #: its GPUs where the worker knows them (``GPU=auto``), with the tasks
    #: holding each; empty where GPU is just a number
    gpus: list[GpuInfo]
    #: bytes of memory its process may use (0: no limit); this is the
    #: machine's memory, not the ``MEMORY`` resource tasks declare
    memory_limit: int
    #: its process's resident memory (bytes), as it last said
    memory: int
    #: bytes of results it has spilled to its local disk
    spilled_bytes: int
    #: past its pause fraction of memory: it starts nothing new, and nothing
    #: more is placed there until it is below again
    paused: bool


class ClusterInfo(TypedDict):
    address: str
    #: where the scheduler's web dashboard and /metrics listen ("" when off)
    dashboard_address: str
    #: by worker address
    workers: dict[str, WorkerInfo]
    #: how many tasks are in each state
    tasks: dict[str, int]


def worker_info(w: pb.WorkerInfo) -> WorkerInfo:
    return {
        "name": w.name,
        "nthreads": w.nthreads,
        "resources": dict(w.resources),
        "used_resources": dict(w.used_resources),
        "running": w.running,
        "queued": w.queued,
        "draining": w.draining,
        "resources_text": dict(w.resources_text),
        "gpus": _gpus(w),
        "memory_limit": w.memory_limit,
        "memory": w.memory,
        "spilled_bytes": w.spilled_bytes,
        "paused": w.paused,
    }


def _gpus(w: pb.WorkerInfo) -> list[GpuInfo]:
    holders = {use.device: list(use.keys) for use in w.gpu_use}
    return [
        {
            "id": g.id,
            "index": g.index,
            "uuid": g.uuid,
            "name": g.name,
            "memory": g.memory_bytes,
            "tasks": holders.get(g.id, []),
        }
        for g in w.gpus
    ]


def cluster_info(state: pb.ClusterState) -> ClusterInfo:
    """``GetClusterState`` as the dict that ``Client.scheduler_info()`` returns."""
    return {
        "address": state.address,
        "dashboard_address": state.dashboard_address,
        "workers": {w.address: worker_info(w) for w in state.workers},
        "tasks": dict(state.task_counts),
    }


__all__ = ["ClusterInfo", "GpuInfo", "WorkerInfo", "cluster_info", "worker_info"]
