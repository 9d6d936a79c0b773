"""Workers that know their memory, on real processes: a worker with a small
``--memory-limit`` spills results to its local disk and serves them back
intact; a task that grows it past the pause fraction pauses it (nothing more
is placed there until it falls back); one that grows it past the terminate
fraction gets it restarted by its nanny, and errs with ``KilledWorker``.

Limits are set relative to a worker process's own size (about 60 MB idle,
80 MB after running tasks here): 400 MB gives a target of 240 MB of results,
spilling past 280 MB resident, pausing past 320 MB, a restart past 380 MB.
The tasks that grow a worker measure it first and grow it to a fraction of
its limit, so the tests do not hang on how large an idle worker is.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import client_sdk
from client_sdk import Client, get_task_context
from protos import apportion_pb2 as pb
from tests.helpers.processes import Processes, cluster_state, run_apportion, wait_for

LIMIT = 400_000_000
#: The holder's: its 320 MB of results on top of its own ~60 MB would reach
#: 0.95 of LIMIT should the spill fall behind, and the nanny would restart it.
HOLDER_LIMIT = 500_000_000
RESULT_BYTES = 20_000_000


def make(i: int) -> bytes:
    time.sleep(0.02)  # results come about as fast as a disk takes them
    return bytes([i]) * RESULT_BYTES


def summary(*values: bytes) -> list[tuple[int, int, bool]]:
    """Each input's first byte, its length, and whether it is that byte throughout."""
    return [(v[0], len(v), v.count(v[:1]) == len(v)) for v in values]


def grow_to(
    fraction: float, limit: int, release: str = "", hold: float = 0.0, in_child: bool = False
) -> str:
    """Grow this worker's resident memory to ``fraction`` of ``limit``, keep it
    until the file ``release`` appears (or for ``hold`` seconds), then give it
    back. ``in_child``: the task runs in a child of the worker (``isolate=True``),
    and the worker's memory is its own and its children's."""
    import os

    import psutil

    from apportion_common.process_memory import Resident

    this = psutil.Process()
    used = Resident(this.ppid())() if in_child else this.memory_info().rss
    ballast = b"x" * max(int(fraction * limit) - used, 0)  # written through: resident
    deadline = time.monotonic() + (hold or 60)
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.02)
    del ballast
    return get_task_context().worker_name


def stamp() -> tuple[str, float]:
    return get_task_context().worker_name, time.time()


def worker_info(address: str, name: str) -> pb.WorkerInfo:
    (info,) = [w for w in cluster_state(address).workers if w.name == name]
    return info


def spilled_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def test_a_small_limit_spills_results_and_serves_them_back_intact(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "spill"
    holder = processes.worker(
        scheduler_address,
        "--name",
        "holder",
        "--memory-limit",
        str(HOLDER_LIMIT),
        "--local-directory",
        str(spill_dir),
    )
    processes.worker(scheduler_address, "--name", "consumer")
    n = 16  # 320 MB of results: past the 300 MB target, so some go to disk
    with Client(scheduler_address) as client:
        made = [client.submit(make, i, workers=["holder"]) for i in range(n)]
        wait_for(lambda futures=made: all(f.done() for f in futures), 60, "every result")
        wait_for(lambda: worker_info(scheduler_address, "holder").spilled_bytes > 0, 10, "a spill")
        info = worker_info(scheduler_address, "holder")
        assert info.memory_limit == HOLDER_LIMIT and 0 < info.memory < HOLDER_LIMIT
        assert spilled_files(spill_dir), "nothing on disk"
        (directory,) = spill_dir.iterdir()  # a directory of the worker's own
        assert directory.name.startswith("apportion-worker-")
        # A task on another worker takes them as inputs: read back from disk.
        checked = client.submit(summary, *made, workers=["consumer"]).result(timeout=60)
        assert checked == [(i, RESULT_BYTES, True) for i in range(n)]
        # So does the client.
        for i, value in enumerate(client.gather(made)):
            assert value == bytes([i]) * RESULT_BYTES
        info = client.scheduler_info()["workers"]
        holder_info = next(w for w in info.values() if w["name"] == "holder")
        assert holder_info["spilled_bytes"] > 0 and not holder_info["paused"]
        del made, value
        wait_for(lambda: not spilled_files(spill_dir), 15, "spill files to go with the results")
        wait_for(
            lambda: worker_info(scheduler_address, "holder").spilled_bytes == 0,
            10,
            "spilled bytes to go back to 0",
        )
    holder.terminate()
    assert holder.wait(20) == 0
    assert list(spill_dir.iterdir()) == []  # its directory went with it


def test_a_worker_past_its_pause_fraction_takes_nothing_new_until_it_falls_back(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(
        scheduler_address, "--name", "big", "--memory-limit", "400MB", "--nthreads", "2"
    )
    processes.worker(scheduler_address, "--name", "other")
    release = tmp_path / "release"
    with Client(scheduler_address) as client:
        hog = client.submit(grow_to, 0.875, LIMIT, str(release), workers=["big"])
        wait_for(lambda: worker_info(scheduler_address, "big").paused, 20, "big to pause")
        status = run_apportion("status", scheduler_address)
        assert "paused" in status.stdout, status.stdout
        # Unrestricted work goes elsewhere at once...
        assert client.submit(stamp).result(timeout=20)[0] == "other"
        # ...work only it may run waits, though it has a free thread.
        waiting = client.submit(stamp, workers=["big"])
        time.sleep(1.0)
        assert not waiting.done()
        assert "waits for big to resume: paused" in client.explain(waiting)
        assert worker_info(scheduler_address, "big").running == 1
        released_at = time.time()
        release.touch()
        assert hog.result(timeout=20) == "big"
        where, started = waiting.result(timeout=20)
        assert where == "big" and started > released_at
        wait_for(lambda: not worker_info(scheduler_address, "big").paused, 10, "big to resume")


def test_an_isolated_task_s_memory_counts_as_its_worker_s(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    processes.worker(scheduler_address, "--name", "big", "--memory-limit", "400MB")
    release = tmp_path / "release"
    with Client(scheduler_address) as client:
        hog = client.submit(grow_to, 0.875, LIMIT, str(release), in_child=True, isolate=True)
        wait_for(lambda: worker_info(scheduler_address, "big").paused, 30, "big to pause")
        assert worker_info(scheduler_address, "big").memory > 0.8 * LIMIT
        release.touch()
        assert hog.result(timeout=20) == "big"
        wait_for(lambda: not worker_info(scheduler_address, "big").paused, 10, "big to resume")


def test_a_worker_past_its_terminate_fraction_is_restarted_and_the_task_errs(
    processes: Processes, tmp_path: Path
) -> None:
    address = processes.scheduler("--allowed-failures", "1")
    processes.worker(address, "--name", "small", "--memory-limit", "400MB")
    with Client(address) as client:
        started = time.monotonic()
        doomed = client.submit(grow_to, 1.05, LIMIT, "", 30.0, key="doomed-hog")
        with pytest.raises(client_sdk.KilledWorker, match="doomed-hog"):
            doomed.result(timeout=40)
        assert time.monotonic() - started < 30  # killed, not waited out
        # The nanny started it again each time: it is back, and works.
        wait_for(lambda: len(cluster_state(address).workers) == 1, 20, "the worker to come back")
        assert client.submit(stamp).result(timeout=20)[0] == "small"
