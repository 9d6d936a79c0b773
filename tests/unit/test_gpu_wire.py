"""GPUs on the wire and in the books: a worker's devices and which task holds
each travel from the worker (its registration, its reports) through the
scheduler's checks and state to ``scheduler_info()`` and ``apportion status``;
``isolate=True`` travels from ``submit`` to the worker's assignment. The
scheduler only shows devices: it never places on them."""

from __future__ import annotations

import pytest
from rich.console import Console

from apportion.cli.status_view import status_view
from apportion_common.boundary import WireError
from apportion_common.gpus import GpuDevice
from client_sdk._spec import SpecBuilder, task_options
from client_sdk.info import cluster_info
from protos import apportion_pb2 as pb
from scheduler_service import wire as scheduler_wire
from scheduler_service.commands import AssignTask
from scheduler_service.events import GpuUseReported, TasksSubmitted, WorkerJoined
from scheduler_service.state import ClusterState
from tests.helpers.scheduler_sim import Sim, assigns, q
from worker_service import wire as worker_wire

H200 = 143_771 * 1024 * 1024
GPUS = (
    GpuDevice("0", 0, "GPU-aaaa", "NVIDIA H200", H200),
    GpuDevice("1", 1, "GPU-bbbb", "NVIDIA H200", H200),
)


def registered(gpus: tuple[GpuDevice, ...] = GPUS) -> pb.RegisterWorker:
    msg = worker_wire.registration_to_pb("w", "127.0.0.1:9000", 2, {"GPU": 2.0}, 7, [], gpus=gpus)
    return msg.register


def test_a_registration_carries_the_devices_and_the_scheduler_keeps_them() -> None:
    assert scheduler_wire.registration_from_pb(registered()).gpus == GPUS
    assert scheduler_wire.registration_from_pb(registered(())).gpus == ()


@pytest.mark.parametrize(
    ("gpus", "detail"),
    [
        ((GPUS[0], GPUS[0]), "gpus: a device id is listed twice"),
        ((GpuDevice("", 0, "u", "n", 1),), "gpus[0].id: String should have at least 1"),
        ((GpuDevice("x" * 129, 0, "u", "n", 1),), "gpus[0].id: String should have at most 128"),
    ],
)
def test_a_registration_with_bad_devices_is_refused_naming_them(
    gpus: tuple[GpuDevice, ...], detail: str
) -> None:
    with pytest.raises(WireError, match="RegisterWorker from") as info:
        scheduler_wire.registration_from_pb(registered(gpus))
    assert detail in str(info.value)


def test_who_holds_which_device_goes_from_the_reports_to_status() -> None:
    reports = worker_wire.Reports(gpu_use={"0": ["train-1"], "1": []})
    assert reports  # a change of holders alone is worth a message
    msg = worker_wire.reports_to_pb(reports).reports
    event = scheduler_wire.gpu_use_from_pb(3, msg)
    assert event == GpuUseReported(3, (("0", ("train-1",)), ("1", ())))
    # No snapshot in a batch: nothing changed (an empty one would free them all).
    assert (
        scheduler_wire.gpu_use_from_pb(
            3, worker_wire.reports_to_pb(worker_wire.Reports(heartbeat=True)).reports
        )
        is None
    )

    sim = Sim()
    sim(WorkerJoined(3, "w3", "127.0.0.1:9003", 2, q(GPU=2), gpus=GPUS))
    sim(event)
    state: ClusterState = sim.state
    snapshot = scheduler_wire.cluster_state_to_pb("127.0.0.1:8786", state.snapshot())
    info = cluster_info(snapshot)
    (worker,) = info["workers"].values()
    assert worker["gpus"] == [
        {
            "id": "0",
            "index": 0,
            "uuid": "GPU-aaaa",
            "name": "NVIDIA H200",
            "memory": H200,
            "tasks": ["train-1"],
        },
        {
            "id": "1",
            "index": 1,
            "uuid": "GPU-bbbb",
            "name": "NVIDIA H200",
            "memory": H200,
            "tasks": [],
        },
    ]
    console = Console(width=80, record=True, color_system=None)
    console.print(status_view(info))
    text = console.export_text()
    assert "gpu 0: train-1" in text and "gpu 1: free" in text


def test_a_bad_gpu_use_report_is_refused() -> None:
    msg = pb.WorkerReports(gpu_use_sent=True, gpu_use=[pb.GpuUse(device="", keys=["k"])])
    with pytest.raises(WireError, match=r"gpu_use\[0\].device"):
        scheduler_wire.gpu_use_from_pb(1, msg)
    msg = pb.WorkerReports(gpu_use_sent=True, gpu_use=[pb.GpuUse(device="0", keys=[""])])
    with pytest.raises(WireError, match=r"gpu_use\[0\].keys\[0\]"):
        scheduler_wire.gpu_use_from_pb(1, msg)


def test_workers_without_devices_show_none() -> None:
    sim = Sim()
    sim.join(1, GPU=2)
    info = cluster_info(scheduler_wire.cluster_state_to_pb("a:1", sim.state.snapshot()))
    assert [w["gpus"] for w in info["workers"].values()] == [[]]


def test_isolate_travels_from_submit_to_the_workers_assignment() -> None:
    options = task_options({"GPU": 1}, None, None, None, False, annotated=False, isolate=True)
    spec = SpecBuilder().spec(len, ((),), {}, "k", options, client=None)
    assert spec.isolate
    submission = scheduler_wire.submission_from_pb(spec)
    assert submission.isolate

    sim = Sim()
    sim.join(1, GPU=1)
    (run,) = assigns(sim(TasksSubmitted("c", (submission,))))
    assert run.isolate
    assignment = worker_wire.assignment_from_pb(scheduler_wire.assignment_to_pb(run), "a")
    assert assignment.isolate and assignment.gpus == ()
    plain = AssignTask(1, "p", 2, b"", q(GPU=1), ())
    assert not worker_wire.assignment_from_pb(scheduler_wire.assignment_to_pb(plain), "a").isolate
