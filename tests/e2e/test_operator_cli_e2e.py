"""The operator's commands: ``apportion set-resources``, ``apportion explain``
and the scheduler's --allowed-failures and --no-worker-timeout checks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from client_sdk import Client
from tests.helpers.processes import Processes, cluster_state, wait_for, wait_for_workers
from tests.helpers.tasks import timed_sleep, touch_then_sleep


def _cli(processes: Processes, *args: str) -> tuple[int, str, str]:
    """Run a short ``apportion`` command to the end: (status, stdout, stderr)."""
    proc = processes.start(*args, capture=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"apportion {' '.join(args)} did not exit within 30s") from None
    return proc.returncode, out.decode(), err.decode()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("apportion: error: "), err
    return lines[0]


def test_set_resources_changes_what_a_worker_declares(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "gpu", "--resources", "GPU=1 MEMORY=1GiB")
    code, out, err = _cli(processes, "set-resources", scheduler_address, "gpu", "GPU=4")
    assert code == 0, err
    (worker,) = cluster_state(scheduler_address).workers
    assert out.strip() == f"gpu ({worker.address}) now declares GPU=4"
    # The new declaration replaces the old one as a whole.
    assert dict(worker.resources) == {"GPU": 4}
    with Client(scheduler_address) as client:
        (info,) = client.scheduler_info()["workers"].values()
        assert info["resources"] == {"GPU": 4}
        # The scheduler places by it: a task needing GPU=4 runs now.
        client.submit(timed_sleep, 0.0, resources={"GPU": 4}).result(timeout=15)
    # By address, with byte units and commas.
    code, out, err = _cli(
        processes, "set-resources", scheduler_address, worker.address, "GPU=2,MEMORY=2GiB"
    )
    assert code == 0, err
    assert out.strip().endswith("now declares GPU=2 MEMORY=2GiB")  # as written
    (worker,) = cluster_state(scheduler_address).workers
    assert dict(worker.resources) == {"GPU": 2, "MEMORY": 2 * 1024**3}
    # The text follows the new input, into status.
    assert dict(worker.resources_text) == {"GPU": "2", "MEMORY": "2GiB"}
    code, out, err = _cli(processes, "status", scheduler_address)
    assert code == 0, err
    assert "MEMORY 0/2GiB" in out, out


def test_set_resources_refuses_an_unknown_worker_and_a_bad_amount(
    processes: Processes, scheduler_address: str
) -> None:
    processes.worker(scheduler_address, "--name", "gpu", "--resources", "GPU=1")
    code, out, err = _cli(processes, "set-resources", scheduler_address, "nope", "GPU=4")
    assert code == 2
    assert out == ""
    assert "nope" in _one_error_line(err)
    for bad in ("GPU=-1", "GPU=abc", "GPU"):
        code, out, err = _cli(processes, "set-resources", scheduler_address, "gpu", bad)
        assert code == 2, (bad, out, err)
        line = _one_error_line(err)
        assert "GPU" in line, line
        assert bad.partition("=")[2] in line, line
    (worker,) = cluster_state(scheduler_address).workers
    assert dict(worker.resources) == {"GPU": 1}


def test_explain_prints_one_sentence(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--name", "w", "--resources", "GPU=1")
    with Client(scheduler_address) as client:
        running = client.submit(
            touch_then_sleep, str(tmp_path), "run", 2.0, resources={"GPU": 1}, key="cli-running"
        )
        never = client.submit(timed_sleep, 0.0, resources={"TPU": 2}, key="cli-no-tpu")
        wait_for(lambda: (tmp_path / "run.started").exists(), 15, "the running task to start")
        code, out, err = _cli(processes, "explain", scheduler_address, "cli-running")
        assert (code, out) == (0, "task 'cli-running' is running on w\n"), err

        code, out, err = _cli(processes, "explain", scheduler_address, "cli-no-tpu")
        assert code == 0, err
        assert out.count("\n") == 1, out
        assert out.strip() == (
            "task 'cli-no-tpu' cannot run yet: no worker offers TPU=2 "
            "(the most any worker offers is TPU=0)"
        )
        code, out, err = _cli(processes, "explain", scheduler_address, "no-such-key")
        assert code == 0, err
        assert "not known" in out and "no-such-key" in out, out
        never.cancel()
        running.result(timeout=15)


def test_nworkers_passes_amounts_to_each_process_exactly(
    processes: Processes, scheduler_address: str
) -> None:
    # Seven significant digits and more: the supervisor must not round them.
    processes.worker(
        scheduler_address,
        "--nworkers",
        "2",
        "--resources",
        "MEMORY=64GiB GPU=0.1234567 LICENSE=100000001",
        wait=False,
    )
    wait_for_workers(scheduler_address, 2)
    for worker in cluster_state(scheduler_address).workers:
        assert dict(worker.resources) == {
            "MEMORY": 64 * 1024**3,
            "GPU": 0.1234567,
            "LICENSE": 100000001,
        }
    with Client(scheduler_address) as client:
        future = client.submit(timed_sleep, 0.0, resources={"LICENSE": 100000001})
        future.result(timeout=15)


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--allowed-failures", "-1", "allowed_failures"),
        ("--no-worker-timeout", "0", "no_worker_timeout"),
        ("--no-worker-timeout", "-2", "no_worker_timeout"),
        ("--no-worker-timeout", "nan", "no_worker_timeout"),
    ],
)
def test_scheduler_refuses_bad_failure_settings(
    processes: Processes, flag: str, value: str, named: str
) -> None:
    # --port 0: if it did start, it would take no fixed port (and the timeout fails the test).
    code, out, err = _cli(processes, "scheduler", "--port", "0", flag, value)
    assert code == 2, (out, err)
    assert "listening" not in out
    assert named in _one_error_line(err)
