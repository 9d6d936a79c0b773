"""Process lifecycle: clean stops on SIGTERM/SIGINT, and workers reconnecting
with backoff when the scheduler comes back on the same address."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from client_sdk import Client
from tests.helpers.processes import APPORTION, Processes, cluster_state, read_line, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_scheduler_and_worker_stop_cleanly(processes: Processes, sig: signal.Signals) -> None:
    address = processes.scheduler()
    worker = processes.worker(address, "--resources", "GPU=1")
    worker.send_signal(sig)
    assert worker.wait(15) == 0
    wait_for(lambda: not cluster_state(address).workers, 10, "the scheduler to notice")
    scheduler = processes.procs[0]
    scheduler.send_signal(sig)
    assert scheduler.wait(15) == 0


def test_worker_reconnects_when_the_scheduler_returns(processes: Processes) -> None:
    port = free_port()
    first = processes.start("scheduler", "--port", str(port))
    assert "listening on" in read_line(first, 30)
    address = f"127.0.0.1:{port}"
    processes.worker(address, "--resources", "GPU=2", "--name", "survivor")

    first.kill()
    first.wait(10)
    worker = processes.procs[-1]
    assert worker.poll() is None  # the worker keeps trying, it does not die

    second = processes.start("scheduler", "--port", str(port))
    assert "listening on" in read_line(second, 30)
    wait_for(lambda: len(cluster_state(address).workers) == 1, 20, "the worker to re-register")
    assert cluster_state(address).workers[0].name == "survivor"
    with Client(address) as client:
        assert client.submit(pow, 2, 5, resources={"GPU": 2}).result(timeout=30) == 32
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0


def test_scheduler_refuses_a_busy_port(processes: Processes) -> None:
    address = processes.scheduler()
    port = address.rsplit(":", 1)[1]
    result = subprocess.run(
        [APPORTION, "scheduler", "--port", port],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert port in result.stderr
