"""Code and control on a running cluster (issue 13): client.upload_file,
client.run, client.restart, client.shutdown and ``apportion restart``, on
real scheduler and worker processes started as a user starts them."""

from __future__ import annotations

import importlib
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apportion_common.serialize import SerializationError
from client_sdk import Client
from client_sdk.exceptions import FutureCancelledError
from tests.helpers.processes import (
    Processes,
    assert_all_released,
    cluster_state,
    run_apportion,
    wait_for,
)


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process imports from (the workers do not)."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))


def write_module(directory: Path, source: str) -> Path:
    path = directory / f"apportion_upload_{secrets.token_hex(4)}.py"
    path.write_text(source)
    return path


def pids(address: str) -> set[int]:
    return {w.pid for w in cluster_state(address).workers}


def test_an_uploaded_module_reaches_every_worker_now_and_later(
    processes: Processes, module_dir: Path
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "early")
    path = write_module(module_dir, "def triple(x):\n    return 3 * x\n")
    module = importlib.import_module(path.stem)
    try:
        with Client(address) as client:
            with pytest.raises(SerializationError, match=f"No module named '{path.stem}'"):
                client.submit(module.triple, 2).result(timeout=30)
            client.upload_file(path)
            assert client.submit(module.triple, 2, pure=False).result(timeout=30) == 6
            processes.worker(address, "--name", "late", "--resources", "LATE=1")
            late = client.submit(module.triple, 5, resources={"LATE": 1})
            assert late.result(timeout=30) == 15
            broken = write_module(module_dir, "raise RuntimeError('not today')\n")
            with pytest.raises(ValueError, match="does not import: RuntimeError: not today"):
                client.upload_file(broken)
            with pytest.raises(ValueError, match=re.escape("only .py, .zip, .egg")):
                client.upload_file(module_dir / "notes.txt")
    finally:
        sys.modules.pop(path.stem, None)


def test_run_calls_a_function_on_each_worker_outside_the_task_slots(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "a")
    processes.worker(address, "--name", "b")
    with Client(address) as client:
        busy = [client.submit(time.sleep, 3, pure=False) for _ in range(2)]
        wait_for(lambda: sum(w.running for w in cluster_state(address).workers) == 2, 30, "busy")
        began = time.monotonic()
        assert set(client.run(os.getpid).values()) == pids(address)
        assert time.monotonic() - began < 2.5  # did not wait for a thread
        only_b = client.run(os.getpid, workers=["b"])
        assert len(only_b) == 1
        with pytest.raises(ZeroDivisionError):
            client.run(divmod, 1, 0)
        with pytest.raises(KeyError, match="nope"):
            client.run(os.getpid, workers=["nope"])
        client.gather(busy)
    assert_all_released(address)


def test_restart_cancels_every_task_and_brings_the_workers_back_afresh(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "r", "--resources", "GPU=1")
    before = pids(address)
    with Client(address) as client:
        stuck = client.submit(time.sleep, 60, resources={"GPU": 1}, pure=False)
        waiting = client.submit(time.sleep, 60, resources={"GPU": 1}, pure=False)
        wait_for(lambda: sum(w.running for w in cluster_state(address).workers) == 1, 30, "start")
        back = client.restart(timeout=60)
        assert [w["name"] for w in back.values()] == ["r"]
        assert stuck.status == "cancelled" and waiting.status == "cancelled"
        with pytest.raises(FutureCancelledError):
            waiting.result(timeout=5)
        assert pids(address).isdisjoint(before)  # fresh processes
        assert client.submit(pow, 2, 10, resources={"GPU": 1}).result(timeout=30) == 1024
    assert_all_released(address)
    done = run_apportion("restart", address, "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "restarted: 1 worker(s) registered"


def test_shutdown_stops_the_workers_and_the_scheduler(processes: Processes) -> None:
    address = processes.scheduler()
    worker = processes.worker(address, "--nworkers", "2")
    wait_for(lambda: len(cluster_state(address).workers) == 2, 30, "both worker processes")
    scheduler = processes.procs[0]
    with Client(address) as client:
        assert client.submit(pow, 3, 2).result(timeout=30) == 9
        client.shutdown()
    assert worker.wait(30) == 0
    assert scheduler.wait(30) == 0
