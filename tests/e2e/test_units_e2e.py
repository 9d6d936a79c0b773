"""Byte units in resource amounts, from the command line to a running task."""

from __future__ import annotations

from client_sdk import Client
from tests.helpers.processes import Processes
from tests.helpers.tasks import where_and_held

GIB = 1024**3


def test_worker_and_task_amounts_with_units_are_bytes(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "MEMORY=64GiB", "--name", "big")
    with Client(scheduler_address) as client:
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["resources"] == {"MEMORY": 68719476736.0}
        future = client.submit(where_and_held, resources={"MEMORY": "32GiB"})
        name, held = future.result(timeout=30)
    assert name == "big"
    assert held == {"MEMORY": 34359738368.0}
    assert held == {"MEMORY": 32.0 * GIB}
