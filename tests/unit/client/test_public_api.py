"""The public surface is pinned: names may be added (update this list), never dropped."""

from __future__ import annotations

import inspect

import client_sdk
from protos import apportion_pb2 as pb


def test_client_sdk_exports() -> None:
    assert set(client_sdk.__all__) >= {"Client", "LocalCluster", "annotate", "get_task_context"}
    assert sorted(client_sdk.__all__) == [
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
        "TLS",
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
    for name in client_sdk.__all__:
        assert getattr(client_sdk, name) is not None


def test_submit_signature_matches_the_contract() -> None:
    params = inspect.signature(client_sdk.Client.submit).parameters
    assert list(params)[:3] == ["self", "fn", "args"]
    for name in ("resources", "key", "retries", "priority", "kwargs"):
        assert name in params
    assert "resources" in inspect.signature(client_sdk.Client.map).parameters
    future_api = {"key", "status", "done", "result", "exception", "cancel"}
    assert future_api <= set(dir(client_sdk.Future))


def test_grpc_names_match_the_contract() -> None:
    assert pb.DESCRIPTOR.package == "apportion.v1"
    services = pb.DESCRIPTOR.services_by_name
    assert services["Scheduler"].full_name == "apportion.v1.Scheduler"
    assert services["Worker"].full_name == "apportion.v1.Worker"
    assert "GetClusterState" in services["Scheduler"].methods_by_name
