"""`apportion scheduler --placement pack|spread`, end to end."""

from __future__ import annotations

import pytest

from client_sdk import Client
from tests.helpers.processes import Processes, assert_all_released
from tests.helpers.tasks import where_and_held


def where(_: int) -> str:
    return where_and_held()[0]


@pytest.mark.parametrize(("placement", "workers_used"), [("spread", 2), ("pack", 1)])
def test_placement_setting(processes: Processes, placement: str, workers_used: int) -> None:
    address = processes.scheduler("--placement", placement)
    for _ in range(2):
        processes.worker(address, "--resources", "GPU=2", "--nthreads", "2")
    with Client(address) as client:
        # Two GPU=1 tasks, submitted together: spread puts one on each worker,
        # pack fills the first worker (2 GPUs, 2 threads) before the second.
        futures = client.map(where, [0, 1], resources={"GPU": 1})
        names = set(client.gather(futures))
    assert len(names) == workers_used
    assert_all_released(address)


def test_bad_placement_is_refused(processes: Processes) -> None:
    proc = processes.start("scheduler", "--placement", "random", capture=True)
    assert proc.wait(30) == 2
    assert proc.stderr is not None
    assert "placement" in proc.stderr.read().decode()
