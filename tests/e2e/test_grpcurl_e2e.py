"""The gRPC surface, seen through the real grpcurl binary (reflection, health)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from tests.helpers.processes import Processes, read_line

Grpcurl = Callable[..., subprocess.CompletedProcess[str]]


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"grpcurl failed: {result.stderr}"
    return result.stdout


def test_scheduler_lists_its_services(scheduler_address: str, grpcurl: Grpcurl) -> None:
    services = _ok(grpcurl(scheduler_address, "list")).split()
    assert "apportion.v1.Scheduler" in services
    assert "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_scheduler_describe_shows_get_cluster_state(
    scheduler_address: str, grpcurl: Grpcurl
) -> None:
    described = _ok(grpcurl(scheduler_address, "describe", "apportion.v1.Scheduler"))
    assert "GetClusterState" in described and "WorkerStream" in described


def test_scheduler_health_is_serving(scheduler_address: str, grpcurl: Grpcurl) -> None:
    answer = json.loads(_ok(grpcurl(scheduler_address, "grpc.health.v1.Health/Check")))
    assert answer == {"status": "SERVING"}
    named = grpcurl(
        "-d",
        '{"service": "apportion.v1.Scheduler"}',
        scheduler_address,
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(_ok(named)) == {"status": "SERVING"}


def test_get_cluster_state_returns_the_workers(
    processes: Processes, scheduler_address: str, grpcurl: Grpcurl
) -> None:
    processes.worker(scheduler_address, "--resources", "GPU=2", "--nthreads", "3", "--name", "g1")
    processes.worker(scheduler_address, "--resources", "MEMORY=1e9", "--name", "m1")
    state = json.loads(
        _ok(grpcurl("-d", "{}", scheduler_address, "apportion.v1.Scheduler/GetClusterState"))
    )
    assert state["address"] == scheduler_address
    by_name = {w["name"]: w for w in state["workers"]}
    assert set(by_name) == {"g1", "m1"}
    assert by_name["g1"]["nthreads"] == 3
    assert by_name["g1"]["resources"] == {"GPU": 2}
    assert by_name["m1"]["resources"] == {"MEMORY": 1e9}
    assert all(":" in w["address"] for w in state["workers"])
    # Used resources are zero: proto3 JSON leaves out zero amounts or shows 0.
    assert all(v == 0 for v in by_name["g1"].get("usedResources", {}).values())


def test_worker_serves_the_worker_service_and_health(
    processes: Processes, scheduler_address: str, grpcurl: Grpcurl
) -> None:
    worker = processes.worker(scheduler_address, "--name", "w")
    line = read_line(worker, 10)
    assert "serving on" in line, line
    worker_address = line.rsplit(" ", 1)[-1]
    services = _ok(grpcurl(worker_address, "list")).split()
    assert "apportion.v1.Worker" in services
    assert "grpc.health.v1.Health" in services
    answer = json.loads(_ok(grpcurl(worker_address, "grpc.health.v1.Health/Check")))
    assert answer == {"status": "SERVING"}
