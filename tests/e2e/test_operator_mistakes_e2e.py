"""Operator mistakes refused with one clear line (issue 13): a worker name that is
taken, a worker pointed at something that is not an apportion scheduler or at
nothing at all (--death-timeout), a port already in use."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from client_sdk import Client, SchedulerConnectionError
from tests.helpers.processes import Processes, cluster_state

#: Every command below must end on its own within this (a refused one at once).
EXIT_WITHIN_S = 30


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wait for ``proc`` to exit on its own; its status and what it said on stderr."""
    try:
        _, err = proc.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running after {EXIT_WITHIN_S}s:\n{err.decode()}") from None
    return proc.returncode, err.decode()


def test_a_worker_whose_name_is_taken_is_refused_and_exits_naming_the_other(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "gpu-1", "--resources", "GPU=2")
    first = next(w for w in cluster_state(address).workers if w.name == "gpu-1")
    second = processes.start("worker", address, "--name", "gpu-1", capture=True)
    code, err = finish(second)
    assert code != 0
    assert "gpu-1" in err and first.address in err and "taken" in err, err
    assert "Traceback" not in err
    # The first is untouched and still the only one.
    assert [(w.name, w.address) for w in cluster_state(address).workers] == [
        ("gpu-1", first.address)
    ]


def test_under_a_nanny_a_refused_name_stops_instead_of_restarting(processes: Processes) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "w", "--nthreads", "1")
    nanny = processes.start("worker", address, "--name", "w", "--nanny", capture=True)
    code, err = finish(nanny)
    assert code != 0 and "taken" in err, err
    assert err.count("taken") == 1, "the nanny restarted a worker that could never register"


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_pointed_at_another_workers_port_says_it_is_no_scheduler(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "real")
    worker_port = cluster_state(address).workers[0].address
    lost = processes.start("worker", worker_port, "--no-nanny", capture=True)
    code, err = finish(lost)
    assert code != 0
    assert f"{worker_port} is not an apportion scheduler" in err, err
    assert "UNIMPLEMENTED" in err


def test_a_worker_pointed_at_an_http_server_says_so(processes: Processes, http_server: str) -> None:
    lost = processes.start("worker", http_server, "--no-nanny", capture=True)
    code, err = finish(lost)
    assert code != 0
    assert f"{http_server} is not an apportion scheduler" in err, err


def test_a_client_pointed_at_an_http_server_says_so(http_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(SchedulerConnectionError, match="not an apportion scheduler"):
        Client(http_server, timeout=20)
    assert time.monotonic() - started < 15  # said at once, not after the timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_at_nothing_a_worker_retries_saying_where_and_how_often_until_its_death_timeout(
    processes: Processes,
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    lost = processes.start("worker", nowhere, "--death-timeout", "3", capture=True)
    code, err = finish(lost)
    took = time.monotonic() - started
    assert code != 0
    assert nowhere in err and "attempt 2" in err, err
    assert "death timeout" in err.lower() or "--death-timeout" in err, err
    assert 3 <= took < EXIT_WITHIN_S


def test_the_death_timeout_comes_from_the_environment_too(processes: Processes) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    lost = processes.start(
        "worker",
        nowhere,
        "--no-nanny",
        capture=True,
        env={"APPORTION_WORKER__DEATH_TIMEOUT": "2"},
    )
    code, _ = finish(lost)
    assert code != 0


def test_a_scheduler_on_a_port_in_use_says_address_already_in_use(processes: Processes) -> None:
    address = processes.scheduler()
    port = address.rsplit(":", 1)[1]
    second = processes.start("scheduler", "--port", port, capture=True)
    code, err = finish(second)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("apportion: error:")]
    assert len(lines) == 1 and "already in use" in lines[0].lower(), err
    assert port in lines[0]
