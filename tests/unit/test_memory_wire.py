"""A worker's memory on the wire: its limit in its registration, its figures
in its reports (only when it sends them), and both back out in the
scheduler's WorkerInfo, ``scheduler_info()`` and ``/api/v1/state``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from client_sdk.info import worker_info
from protos import apportion_pb2 as pb
from scheduler_service import wire as scheduler_wire
from scheduler_service.dashboard.activity import RunActivity
from scheduler_service.dashboard.metrics import exposition, make_registry
from scheduler_service.dashboard.view import state_info
from scheduler_service.events import WorkerJoined, WorkerMemoryReported
from scheduler_service.state import ClusterState
from worker_service import wire as worker_wire


def test_the_registration_carries_the_memory_limit() -> None:
    msg = worker_wire.registration_to_pb("w", "10.0.0.1:1", 1, {}, 7, [], memory_limit=400_000_000)
    assert scheduler_wire.registration_from_pb(msg.register).memory_limit == 400_000_000
    bare = worker_wire.registration_to_pb("w", "10.0.0.1:1", 1, {}, 7, [])
    assert scheduler_wire.registration_from_pb(bare.register).memory_limit == 0  # none


def test_memory_figures_travel_only_when_sent() -> None:
    reports = worker_wire.Reports(memory=(300_000_000, 12_345, True))
    assert reports
    msg = worker_wire.reports_to_pb(reports).reports
    assert scheduler_wire.memory_from_pb(3, msg) == WorkerMemoryReported(
        3, 300_000_000, 12_345, True
    )
    # Zeros are figures too: a worker that resumed with nothing spilled.
    msg = worker_wire.reports_to_pb(worker_wire.Reports(memory=(0, 0, False))).reports
    assert scheduler_wire.memory_from_pb(3, msg) == WorkerMemoryReported(3, 0, 0, False)
    heartbeat = worker_wire.reports_to_pb(worker_wire.Reports(heartbeat=True)).reports
    assert scheduler_wire.memory_from_pb(3, heartbeat) is None
    assert not worker_wire.Reports()


def test_the_figures_come_out_in_worker_info_and_the_state_api() -> None:
    state = ClusterState()
    state.handle(WorkerJoined(1, "w", "10.0.0.1:1", 1, {}, memory_limit=400_000_000))
    state.handle(WorkerMemoryReported(1, 350_000_000, 60_000_000, True))
    (snapshot,) = state.snapshot().workers
    info = worker_info(scheduler_wire.worker_info_to_pb(snapshot))
    expected = {
        "memory_limit": 400_000_000,
        "memory": 350_000_000,
        "spilled_bytes": 60_000_000,
        "paused": True,
    }
    assert {k: info[k] for k in expected} == expected  # type: ignore[literal-required]
    api = state_info(state, "s:1", "")["workers"]["10.0.0.1:1"]
    assert {k: api[k] for k in expected} == expected
    # A worker that said nothing yet: the keys are there, at zero.
    fresh = worker_info(pb.WorkerInfo(name="x"))
    assert (fresh["memory_limit"], fresh["memory"], fresh["spilled_bytes"]) == (0, 0, 0)
    assert fresh["paused"] is False


def test_prometheus_shows_each_workers_memory() -> None:
    state = ClusterState()
    state.handle(WorkerJoined(1, "w", "10.0.0.1:1", 1, {}, memory_limit=400_000_000))
    state.handle(WorkerMemoryReported(1, 350_000_000, 60_000_000, True))
    registry = make_registry(state, RunActivity(state), lambda: 0.0)
    seen = {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition(registry).decode())
        for sample in family.samples
        if sample.labels == {"worker": "w"}
    }
    assert seen["apportion_worker_memory_bytes"] == 350_000_000
    assert seen["apportion_worker_memory_limit_bytes"] == 400_000_000
    assert seen["apportion_worker_spilled_bytes"] == 60_000_000
    assert seen["apportion_worker_paused"] == 1
