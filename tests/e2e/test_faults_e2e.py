"""Fault injection on real processes: frozen and crashing workers, a scheduler
killed and restarted from its state directory, a client killed mid-run.

Every surviving future completes with the right result, and the books end at
exactly zero.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import client_sdk
from client_sdk import Client, SchedulerConnectionError
from tests.helpers.processes import (
    Processes,
    assert_all_released,
    cluster_state,
    read_line,
    wait_for,
    wait_for_workers,
)


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def logged_square(log: str, x: int, seconds: float) -> int:
    """Square ``x`` after ``seconds``, noting each run in ``log`` (runs are counted)."""
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * x


def add_up(values: list[int]) -> int:
    return sum(values)


def crash_interpreter() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exit_abruptly() -> None:
    os._exit(3)


def results(futures: list[client_sdk.Future], timeout: float) -> list[object]:
    return [f.result(timeout=timeout) for f in futures]


def _worker_pid(address: str, name: str) -> int:
    pid = next(w.pid for w in cluster_state(address).workers if w.name == name)
    # Never signal pid 0 (that would be this test's own process group).
    assert pid > 1, f"worker {name} reported no pid"
    return pid


def _names(address: str) -> list[str]:
    return sorted(w.name for w in cluster_state(address).workers)


# ------------------------------------------------------------------ workers


def test_a_frozen_worker_is_declared_lost_and_its_tasks_run_elsewhere(
    processes: Processes,
) -> None:
    address = processes.scheduler("--worker-ttl", "1.5")
    processes.worker(address, "--name", "frozen", "--nthreads", "2")
    with Client(address) as client:
        stuck = [client.submit(slow_square, i, 0.5) for i in range(2)]
        wait_for(lambda: cluster_state(address).workers[0].running == 2, 10, "two runs")
        pid = _worker_pid(address, "frozen")
        os.kill(pid, signal.SIGSTOP)
        try:
            processes.worker(address, "--name", "awake", "--nthreads", "2")
            stopped_at = time.monotonic()
            # The frozen worker keeps its TCP connection but says nothing.
            wait_for(lambda: _names(address) == ["awake"], 10, "the frozen worker to be lost")
            declared_after = time.monotonic() - stopped_at
            assert declared_after < 10  # ttl 1.5 s; generous for a busy machine
            assert results(stuck, 15) == [0, 1]
            more = results(client.map(slow_square, range(4), [0.01] * 4), 15)
            assert more == [0, 1, 4, 9]
        finally:
            os.kill(pid, signal.SIGCONT)
        # Woken, it registers again, cleanly, and runs new work.
        wait_for(lambda: _names(address) == ["awake", "frozen"], 20, "the woken worker")
        everywhere = client.map(slow_square, range(8), [0.2] * 8, key=[f"w{i}" for i in range(8)])
        assert results(everywhere, 15) == [i * i for i in range(8)]
        assert results(stuck, 5) == [0, 1]
    assert_all_released(address)


@pytest.mark.parametrize("crash", [crash_interpreter, exit_abruptly], ids=["segfault", "os._exit"])
def test_a_task_that_kills_its_process_is_restarted_by_the_parent_then_errs(
    processes: Processes, crash: object
) -> None:
    address = processes.scheduler("--allowed-failures", "1")
    supervisor = processes.worker(address, "--name", "nannied", "--nthreads", "2")
    with Client(address) as client:
        fine = client.submit(slow_square, 3, 0.01)
        assert fine.result(timeout=15) == 9
        doomed = client.submit(crash, key="doomed")
        with pytest.raises(client_sdk.KilledWorker, match="doomed"):
            doomed.result(timeout=30)
        # The parent restarted its worker process each time; it is back.
        assert supervisor.poll() is None
        wait_for(lambda: _names(address) == ["nannied"], 20, "the restarted worker")
        others = client.map(slow_square, range(6), [0.01] * 6)
        assert results(others, 20) == [i * i for i in range(6)]
    assert_all_released(address)


# ---------------------------------------------------------------- scheduler


def _restart_scheduler(processes: Processes, port: str, *args: str) -> None:
    deadline = time.monotonic() + 20
    while True:  # the old process's port may take a moment to be free
        proc = processes.start("scheduler", "--port", port, *args)
        line = read_line(proc, 30)
        if "listening on" in line:
            return
        proc.wait(10)
        if time.monotonic() > deadline:
            raise AssertionError(f"the scheduler did not come back on port {port}: {line!r}")
        time.sleep(0.2)


def test_a_killed_scheduler_restarts_from_its_state_dir_and_loses_nothing(
    processes: Processes, tmp_path: Path
) -> None:
    state = str(tmp_path / "state")
    log = str(tmp_path / "runs")
    address = processes.scheduler("--state-dir", state)
    port = address.rsplit(":", 1)[1]
    scheduler = processes.procs[-1]
    processes.worker(address, "--name", "w1", "--nthreads", "2")
    processes.worker(address, "--name", "w2", "--nthreads", "2")
    with Client(address) as client:
        done = client.map(logged_square, [log] * 4, range(4), [0.01] * 4)
        assert results(done, 15) == [0, 1, 4, 9]
        pending = client.map(logged_square, [log] * 8, range(10, 18), [1.0] * 8)
        total = client.submit(add_up, [*done, *pending])
        wait_for(lambda: sum(w.running for w in cluster_state(address).workers) >= 2, 10, "runs")
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(10)
        _restart_scheduler(processes, port, "--state-dir", state)
        # Workers and the client reconnect by themselves; every future completes.
        wait_for_workers(address, 2)
        assert results(pending, 30) == [x * x for x in range(10, 18)]
        assert total.result(timeout=30) == sum(x * x for x in [*range(4), *range(10, 18)])
        assert results(done, 10) == [0, 1, 4, 9]
    runs = Path(log).read_text().split()
    # Results held by live workers were reclaimed, not computed again.
    for x in range(4):
        assert runs.count(str(x)) == 1, runs
    # Each pending task ran at least once to the end; none was lost.
    assert set(runs) == {str(x) for x in [*range(4), *range(10, 18)]}
    assert_all_released(address)


def test_a_client_outlives_a_scheduler_restart_without_a_state_dir(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    port = address.rsplit(":", 1)[1]
    scheduler = processes.procs[-1]
    processes.worker(address, "--nthreads", "2")
    with Client(address) as client:
        finished = client.submit(slow_square, 7, 0.0)
        assert finished.result(timeout=30) == 49
        pending = client.map(slow_square, range(6), [0.5] * 6)
        wait_for(lambda: cluster_state(address).workers[0].running >= 1, 10, "a run")
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(10)
        _restart_scheduler(processes, port)
        # The new scheduler knows nothing; the client submits what it still
        # waits for again.
        assert results(pending, 30) == [i * i for i in range(6)]
        # A result that had finished cannot be made again (its spec is gone
        # with the scheduler): it is lost, and says so.
        wait_for(lambda: finished.status == "lost", 10, "the finished result to be lost")
        assert finished.done()
        with pytest.raises(SchedulerConnectionError, match="is lost"):
            finished.result(timeout=5)
    assert_all_released(address)


# ------------------------------------------------------------------ clients

_CLIENT_SCRIPT = """
import json, sys, time
from client_sdk import Client
from tests.e2e.test_faults_e2e import slow_square
import cloudpickle, tests
cloudpickle.register_pickle_by_value(tests)
client = Client(sys.argv[1])
futures = client.map(slow_square, range(40), [0.25] * 40, resources={"SLOT": 1})
print(json.dumps([f.key for f in futures]), flush=True)
time.sleep(600)
"""


def test_a_killed_clients_tasks_are_cancelled_after_its_grace_period(
    processes: Processes,
) -> None:
    address = processes.scheduler("--client-grace", "1")
    processes.worker(address, "--resources", "SLOT=1", "--nthreads", "2")
    victim = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_SCRIPT, address],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    processes.procs.append(victim)  # stopped by the fixture whatever happens
    keys = json.loads(read_line(victim, 30))
    assert len(keys) == 40
    wait_for(lambda: cluster_state(address).workers[0].running == 1, 15, "the victim's run")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    with Client(address) as survivor:
        # Ten seconds of the victim's work were queued: it is dropped well
        # before that (grace 1 s, then the running task's code returns).
        wait_for(lambda: not cluster_state(address).task_counts, 8, "the victim's tasks to go")
        assert survivor.submit(slow_square, 7, 0.01, resources={"SLOT": 1}).result(10) == 49
    assert_all_released(address)
