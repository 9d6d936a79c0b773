"""The ``apportion`` command line: --resources forms, the environment, bad input,
--nworkers, and ``status``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from client_sdk import Client
from tests.helpers.processes import (
    Processes,
    cluster_state,
    read_line,
    run_apportion,
    wait_for,
    wait_for_workers,
)
from tests.helpers.tasks import max_overlap, timed_sleep

UNREACHABLE = "127.0.0.1:1"  # nothing listens there: a worker that started would hang


def process_slot(seconds: float) -> tuple[int, float, float]:
    start, end = timed_sleep(seconds)
    return os.getpid(), start, end


def _declared(address: str) -> list[dict[str, float]]:
    return [dict(w.resources) for w in cluster_state(address).workers]


def test_resources_flag_accepts_spaces_and_commas(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "A=1 B=2,C=3")
    with Client(scheduler_address) as client:
        (worker,) = client.scheduler_info()["workers"].values()
    assert worker["resources"] == {"A": 1, "B": 2, "C": 3}


def test_resources_from_the_environment_keep_their_case(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, env={"APPORTION_WORKER__RESOURCES__GPU": "2"})
    assert _declared(scheduler_address) == [{"GPU": 2}]


def test_resources_flag_wins_over_the_environment(
    processes: Processes, scheduler_address: str
) -> None:
    env = {"APPORTION_WORKER__RESOURCES__GPU": "2"}
    processes.worker(scheduler_address, "--resources", "GPU=5", env=env)
    assert _declared(scheduler_address) == [{"GPU": 5}]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("GPU", ["GPU"]),
        ("=2", ["=2"]),
        ("GPU=nan", ["GPU", "nan"]),
        ("GPU=-1", ["GPU", "-1"]),
        ("GPU=abc", ["GPU", "abc"]),
        ("A=1 GPU=inf", ["GPU", "inf"]),
    ],
)
def test_bad_resources_exit_2_with_one_line_before_starting(spec: str, named: list[str]) -> None:
    result = run_apportion("worker", UNREACHABLE, "--resources", spec)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in named:
        assert text in lines[0]
    assert "serving on" not in result.stdout  # nothing started


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["worker", UNREACHABLE, "--nthreads", "abc"], "--nthreads"),
        (["worker", UNREACHABLE, "--nthreads", "0"], "nthreads"),
        (["worker"], "ADDRESS"),
        (["worker", "no-port-here"], "HOST:PORT"),
        (["scheduler", "--port", "99999"], "port"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], named: str) -> None:
    result = run_apportion(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_resource_in_the_environment_exits_2() -> None:
    result = run_apportion("worker", UNREACHABLE, env={"APPORTION_WORKER__RESOURCES__GPU": "lots"})
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "GPU" in result.stderr and "lots" in result.stderr
    assert "Traceback" not in result.stderr


def test_nworkers_starts_processes_that_each_get_the_resources(
    processes: Processes, scheduler_address: str
) -> None:
    supervisor = processes.worker(
        scheduler_address,
        "--nworkers",
        "3",
        "--nthreads",
        "2",
        "--resources",
        "process=1",
        wait=False,
    )
    wait_for_workers(scheduler_address, 3)
    workers = cluster_state(scheduler_address).workers
    assert len(workers) == 3
    assert all(dict(w.resources) == {"process": 1} and w.nthreads == 2 for w in workers)
    with Client(scheduler_address) as client:
        futures = [client.submit(process_slot, 0.3, resources={"process": 1}) for _ in range(9)]
        results = client.gather(futures)
    pids = {pid for pid, _, _ in results}
    assert len(pids) == 3
    assert supervisor.pid not in pids
    assert max_overlap([(s, e) for _, s, e in results]) == 3
    for pid in pids:  # each process ran at most one task at once
        assert max_overlap([(s, e) for p, s, e in results if p == pid]) == 1

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(20) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    wait_for(lambda: not cluster_state(scheduler_address).workers, 10, "the workers to leave")


def test_status_json_is_shaped_like_scheduler_info(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "GPU=2 MEMORY=1e9", "--name", "alpha")
    processes.worker(scheduler_address, "--nthreads", "3", "--name", "beta")
    result = run_apportion("status", scheduler_address, "--json")
    assert result.returncode == 0, result
    info = json.loads(result.stdout)  # one JSON object, nothing else
    assert isinstance(info, dict)
    with Client(scheduler_address) as client:
        expected = client.scheduler_info()
    # Each worker's memory is measured anew between the two calls: present, not equal.
    for workers in (info["workers"], expected["workers"]):
        for worker in workers.values():
            assert worker.pop("memory") > 0
    assert info == expected
    assert info["address"] == scheduler_address
    by_name = {w["name"]: w for w in info["workers"].values()}
    assert by_name["alpha"]["resources"] == {"GPU": 2, "MEMORY": 1e9}
    assert by_name["alpha"]["used_resources"] == {"GPU": 0, "MEMORY": 0}
    assert by_name["beta"]["nthreads"] == 3
    assert set(info["workers"]) == {w.address for w in cluster_state(scheduler_address).workers}


def test_status_prints_a_table_naming_the_workers(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--resources", "GPU=2", "--name", "alpha")
    processes.worker(scheduler_address, "--name", "beta")
    result = run_apportion("status", scheduler_address)
    assert result.returncode == 0, result
    assert "alpha" in result.stdout and "beta" in result.stdout
    assert "GPU" in result.stdout
    assert scheduler_address in result.stdout


def hold_until(gate: str, timeout: float) -> None:
    """A task that holds its resources until the file ``gate`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_status_shows_amounts_as_they_were_written(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--resources", "MEMORY=100GB GPU=2", "--name", "alpha")
    env = {"APPORTION_WORKER__RESOURCES__MEMORY": "64GiB"}
    processes.worker(scheduler_address, "--nworkers", "2", "--name", "gamma", env=env, wait=False)
    wait_for_workers(scheduler_address, 3)
    gate = tmp_path / "go"
    with Client(scheduler_address) as client:
        # 70e9 fits only alpha (64GiB is 68.7e9): status shows it held there.
        held = client.submit(hold_until, str(gate), 30, resources={"MEMORY": 70e9, "GPU": 1})
        try:
            wait_for(
                lambda: any(
                    w.used_resources["MEMORY"] for w in cluster_state(scheduler_address).workers
                ),
                15,
                "the task to hold its MEMORY",
            )
            table = run_apportion("status", scheduler_address)
            as_json = run_apportion("status", scheduler_address, "--json")
        finally:
            gate.touch()
        held.result(timeout=30)
    assert table.returncode == 0, table
    rows = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert set(rows) >= {"alpha", "gamma-0", "gamma-1"}, table.stdout
    assert "MEMORY 70GB/100GB" in table.stdout, table.stdout
    assert "GPU 1/2" in table.stdout, table.stdout
    assert table.stdout.count("MEMORY 0/64GiB") == 2, table.stdout  # each child's
    assert "e+" not in table.stdout
    by_name = {w["name"]: w for w in json.loads(as_json.stdout)["workers"].values()}
    assert by_name["alpha"]["resources_text"] == {"MEMORY": "100GB", "GPU": "2"}
    assert by_name["alpha"]["resources"] == {"MEMORY": 100e9, "GPU": 2}  # as before
    for child in ("gamma-0", "gamma-1"):
        assert by_name[child]["resources_text"] == {"MEMORY": "64GiB"}


def test_status_of_an_unreachable_scheduler_fails_in_one_line() -> None:
    result = run_apportion("status", UNREACHABLE)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert UNREACHABLE in result.stderr


def test_worker_settings_from_the_environment(processes: Processes, scheduler_address: str) -> None:
    env = {"APPORTION_WORKER__NTHREADS": "3", "APPORTION_WORKER__RESOURCES__tpu_v4": "0.5"}
    processes.worker(scheduler_address, env=env)
    (worker,) = cluster_state(scheduler_address).workers
    assert worker.nthreads == 3
    assert dict(worker.resources) == {"tpu_v4": 0.5}


def test_resources_flag_wins_over_a_bad_environment_value(
    processes: Processes, scheduler_address: str
) -> None:
    env = {"APPORTION_WORKER__RESOURCES__GPU": "lots"}
    processes.worker(scheduler_address, "--resources", "GPU=1", env=env)
    assert _declared(scheduler_address) == [{"GPU": 1}]


def test_nworkers_supervisor_restarts_a_crashed_worker(
    processes: Processes, scheduler_address: str
) -> None:
    supervisor = processes.worker(scheduler_address, "--nworkers", "2", wait=False)
    wait_for_workers(scheduler_address, 2)
    before = {w.address for w in cluster_state(scheduler_address).workers}
    with Client(scheduler_address) as client:
        victim, _, _ = client.submit(process_slot, 0.0).result(timeout=30)
        assert victim != supervisor.pid
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = {w.address for w in cluster_state(scheduler_address).workers}
            return len(now) == 2 and now != before

        wait_for(replaced, 20, "the supervisor to replace the killed worker")
        results = client.gather([client.submit(process_slot, 0.3) for _ in range(4)])
    assert victim not in {pid for pid, _, _ in results}
    assert supervisor.poll() is None


def test_local_runs_a_cluster_until_sigterm(processes: Processes) -> None:
    local = processes.start("local", "--workers", "2", "--port", "0", "--resources", "GPU=1")
    line = read_line(local, 30)
    assert "scheduler at" in line, line
    address = line.split("scheduler at ", 1)[1].split(",", 1)[0]
    wait_for_workers(address, 2)
    with Client(address) as client:
        futures = [client.submit(process_slot, 0.2, resources={"GPU": 1}) for _ in range(4)]
        results = client.gather(futures)
        info = client.scheduler_info()
    assert len({pid for pid, _, _ in results}) == 2
    assert max_overlap([(s, e) for _, s, e in results]) == 2
    assert all(w["resources"] == {"GPU": 1} for w in info["workers"].values())
    local.send_signal(signal.SIGTERM)
    assert local.wait(20) == 0
    for pid in {pid for pid, _, _ in results}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
