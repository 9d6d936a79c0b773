"""Taking workers out of service without losing work (issue 13): real scheduler
and worker processes, started as a user starts them.

Every task counts its runs in a marker directory, so "nothing recomputed"
is checked, not assumed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from client_sdk import Client
from tests.helpers.processes import (
    Processes,
    assert_all_released,
    cluster_state,
    run_apportion,
    wait_for,
)

MB = 1000 * 1000


def counted(marker_dir: str, name: str, nbytes: int, seconds: float = 0.0) -> tuple[Any, str]:
    """A result of ``nbytes`` (an array and its name); each run leaves a file."""
    import numpy as np

    Path(marker_dir, f"{name}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)
    return np.full(nbytes // 8, 7.0), name


def total(value: tuple[Any, str]) -> tuple[float, str]:
    data, name = value
    return float(data.sum()), name


def runs(marker_dir: Path, name: str) -> int:
    return len(list(marker_dir.glob(f"{name}-*")))


def names(address: str) -> set[str]:
    return {w.name for w in cluster_state(address).workers}


def test_a_retired_worker_hands_over_results_a_pending_task_needs(
    processes: Processes, tmp_path: Path
) -> None:
    address = processes.scheduler()
    holder = processes.worker(address, "--name", "holder", "--resources", "A=1")
    processes.worker(address, "--name", "other", "--resources", "B=1")
    with Client(address) as client:
        x = client.submit(counted, str(tmp_path), "x", 8 * MB, resources={"A": 1})
        x.result(timeout=60)
        # Needs C, which nobody offers yet: it waits for x all along.
        y = client.submit(total, x, resources={"C": 1})
        assert y.status == "pending"
        gone = client.retire_workers(["holder"], timeout=60)
        assert [info["name"] for info in gone.values()] == ["holder"]
        assert holder.wait(30) == 0  # its nanny did not start it again
        assert names(address) == {"other"}
        processes.worker(address, "--name", "c", "--resources", "C=1")
        assert y.result(timeout=60) == (7.0 * (8 * MB // 8), "x")
        assert runs(tmp_path, "x") == 1  # handed over, not computed again
        del x, y
    assert_all_released(address)


def test_retiring_a_worker_running_a_long_gpu_task_lets_it_finish(
    processes: Processes, tmp_path: Path
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "gpu-1", "--resources", "GPU=1")
    processes.worker(address, "--name", "gpu-2", "--resources", "GPU=1")
    with Client(address) as client:
        long = client.submit(
            counted, str(tmp_path), "long", 2 * MB, 2.0, resources={"GPU": 1}, workers=["gpu-1"]
        )
        wait_for(lambda: runs(tmp_path, "long") == 1, 30, "the long task to start")
        retire = run_apportion("retire", address, "gpu-1", "--timeout", "60")
        assert retire.returncode == 0, retire.stderr
        assert retire.stdout.startswith("retired gpu-1 (")
        # Ran once, on gpu-1, to its end; its result now lives on gpu-2.
        assert long.result(timeout=30)[1] == "long" and runs(tmp_path, "long") == 1
        assert names(address) == {"gpu-2"}
        assert client.submit(total, long, resources={"GPU": 1}).result(timeout=30)[1] == "long"
        assert runs(tmp_path, "long") == 1
        del long
    assert_all_released(address)


def test_sigterm_drains_a_worker_before_it_stops(processes: Processes, tmp_path: Path) -> None:
    address = processes.scheduler()
    leaving = processes.worker(address, "--name", "leaving", "--resources", "GPU=1")
    processes.worker(address, "--name", "staying", "--resources", "GPU=1")
    with Client(address) as client:
        busy = client.submit(
            counted, str(tmp_path), "busy", 2 * MB, 1.5, resources={"GPU": 1}, workers=["leaving"]
        )
        wait_for(lambda: runs(tmp_path, "busy") == 1, 30, "the task to start")
        leaving.send_signal(signal.SIGTERM)  # as `kill` or a Kubernetes scale-down does
        assert leaving.wait(30) == 0
        assert busy.result(timeout=30)[1] == "busy" and runs(tmp_path, "busy") == 1
        assert names(address) == {"staying"}
        del busy
    assert_all_released(address)


def test_retire_names_what_is_wrong(processes: Processes) -> None:
    address = processes.scheduler()
    done = run_apportion("retire", address, "nope")
    assert done.returncode == 2
    assert done.stderr.strip() == "apportion: error: no worker 'nope'"


def test_a_drain_timeout_of_zero_stops_at_once(processes: Processes, tmp_path: Path) -> None:
    address = processes.scheduler()
    worker = processes.worker(address, "--name", "quick", "--drain-timeout", "0")
    with Client(address) as client:
        client.submit(counted, str(tmp_path), "slow", 1000, 30.0)
        wait_for(lambda: runs(tmp_path, "slow") == 1, 30, "the task to start")
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        assert time.monotonic() - began < 15  # did not wait for the 30 s task
