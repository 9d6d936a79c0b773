"""How long apportion takes to notice and get over each kind of fault.

Real processes on 127.0.0.1, started as a user starts them:

- a worker frozen with SIGSTOP: seconds until the scheduler declares it lost
  (for several ``--worker-ttl`` values), and until its tasks finished elsewhere;
- the scheduler killed with SIGKILL mid-run and restarted on its state
  directory: seconds until every pending future completed, and how many
  finished results were reclaimed from workers rather than computed again;
- a client killed mid-run: seconds until the tasks only it wanted are gone
  and every lease is back (``--client-grace`` 1 s).

    python -m bench.faults            # prints a table, writes bench/results/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from bench import clusters
from client_sdk import Client
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
APPORTION = str(Path(sys.executable).parent / "apportion")
RESULTS = ROOT / "bench" / "results"


def _state(address: str) -> pb.ClusterState:
    with grpc.insecure_channel(address) as channel:
        state: pb.ClusterState = pb_grpc.SchedulerStub(channel).GetClusterState(
            pb.GetClusterStateRequest(), timeout=10
        )
        return state


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until true; the seconds it took (raises after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


class Procs:
    """Starts ``apportion`` commands; bench.clusters.processes stops them."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.procs = procs

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, APPORTION_LOG_LEVEL="ERROR", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [APPORTION, *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        self.procs.append(proc)
        return proc

    def scheduler(self, *args: str) -> tuple[str, subprocess.Popen[bytes]]:
        proc = self.start("scheduler", *args)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(30):
                raise TimeoutError("the scheduler did not start")
        line = proc.stdout.readline().decode().strip()
        if "listening on" not in line:
            raise RuntimeError(f"the scheduler did not start: {line!r}")
        return line.rsplit(" ", 1)[-1], proc

    def worker(self, address: str, *args: str) -> None:
        before = len(_state(address).workers)
        self.start("worker", address, *args)
        _until(lambda: len(_state(address).workers) > before, 30, "a worker")


@contextmanager
def processes() -> Iterator[Procs]:
    with clusters.processes() as procs:
        yield Procs(procs)


def square_after(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def logged_square(log: str, x: int, seconds: float) -> int:
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * x


def frozen_worker(ttl: float) -> dict[str, float]:
    with processes() as procs:
        address, _ = procs.scheduler("--port", "0", "--worker-ttl", str(ttl))
        procs.worker(address, "--name", "frozen", "--nthreads", "2")
        procs.worker(address, "--name", "awake", "--nthreads", "2")
        with Client(address) as client:
            futures = client.map(square_after, range(8), [0.5] * 8)

            def frozen_busy() -> bool:
                return any(w.name == "frozen" and w.running for w in _state(address).workers)

            _until(frozen_busy, 15, "a run on the frozen worker")
            pid = next(w.pid for w in _state(address).workers if w.name == "frozen")
            assert pid > 1
            os.kill(pid, signal.SIGSTOP)
            start = time.monotonic()
            try:
                lost = _until(
                    lambda: [w.name for w in _state(address).workers] == ["awake"],
                    8 * ttl + 10,
                    "the frozen worker to be declared lost",
                )
                assert [f.result(timeout=60) for f in futures] == [i * i for i in range(8)]
                done = time.monotonic() - start
            finally:
                os.kill(pid, signal.SIGCONT)
            back = _until(lambda: len(_state(address).workers) == 2, 60, "the woken worker")
    return {"ttl_s": ttl, "declared_lost_s": lost, "all_done_s": done, "rejoined_s": back}


def scheduler_restart() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, processes() as procs:
        state_dir, log = str(Path(tmp, "state")), str(Path(tmp, "runs"))
        address, scheduler = procs.scheduler("--port", "0", "--state-dir", state_dir)
        port = address.rsplit(":", 1)[1]
        procs.worker(address, "--nthreads", "2")
        procs.worker(address, "--nthreads", "2")
        with Client(address) as client:
            finished = client.map(logged_square, [log] * 200, range(200), [0.0] * 200)
            [f.result(timeout=60) for f in finished]
            pending = client.map(logged_square, [log] * 40, range(1000, 1040), [0.1] * 40)
            _until(lambda: sum(w.running for w in _state(address).workers) >= 2, 15, "runs")
            scheduler.send_signal(signal.SIGKILL)
            scheduler.wait(10)
            start = time.monotonic()
            for _ in range(100):  # the port may take a moment to be free
                try:
                    procs.scheduler("--port", port, "--state-dir", state_dir)
                    break
                except RuntimeError:
                    time.sleep(0.1)
            up = time.monotonic() - start
            workers_back = _until(lambda: len(_state(address).workers) == 2, 60, "workers")
            assert [f.result(timeout=120) for f in pending] == [x * x for x in range(1000, 1040)]
            done = time.monotonic() - start
            assert [f.result(timeout=30) for f in finished] == [x * x for x in range(200)]
        runs = Path(log).read_text().split()
        recomputed = sum(runs.count(str(x)) - 1 for x in range(200))
    return {
        "restart_s": up,
        "workers_back_s": up + workers_back,
        "all_pending_done_s": done,
        "finished_results": 200,
        "recomputed": recomputed,
    }


_VICTIM = """
import sys, time
from client_sdk import Client
from bench.faults import square_after
client = Client(sys.argv[1])
futures = client.map(square_after, range(200), [0.05] * 200, resources={"SLOT": 1})
print("submitted", flush=True)
time.sleep(600)
"""


def client_killed() -> dict[str, float]:
    grace = 1.0
    with processes() as procs:
        address, _ = procs.scheduler("--port", "0", "--client-grace", str(grace))
        procs.worker(address, "--resources", "SLOT=1", "--nthreads", "2")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        victim = subprocess.Popen(
            [sys.executable, "-c", _VICTIM, address], stdout=subprocess.PIPE, env=env
        )
        procs.procs.append(victim)
        assert victim.stdout is not None
        assert victim.stdout.readline().decode().strip() == "submitted"
        _until(lambda: _state(address).workers[0].running == 1, 15, "the victim's run")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        def gone() -> bool:
            state = _state(address)
            idle = all(not any(w.used_resources.values()) for w in state.workers)
            return idle and not state.task_counts

        released = _until(gone, 60, "the victim's tasks to go")
    return {"client_grace_s": grace, "released_s": released, "queued_work_s": 200 * 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttls", default="1,2,5", help="worker ttls to try (seconds)")
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "frozen_worker": [frozen_worker(float(t)) for t in args.ttls.split(",")],
        "scheduler_restart": scheduler_restart(),
        "client_killed": client_killed(),
    }
    table = Table(title="apportion: faults (seconds after the fault)")
    for column in ("fault", "figure", "value"):
        table.add_column(column)
    for frozen in figures["frozen_worker"]:
        label = f"worker SIGSTOP, --worker-ttl {frozen['ttl_s']:g}"
        table.add_row(label, "declared lost", f"{frozen['declared_lost_s']:.2f}")
        table.add_row("", "its tasks done elsewhere", f"{frozen['all_done_s']:.2f}")
        table.add_row("", "re-registered after SIGCONT", f"{frozen['rejoined_s']:.2f}")
    restart = figures["scheduler_restart"]
    table.add_row("scheduler SIGKILL + restart", "listening again", f"{restart['restart_s']:.2f}")
    table.add_row("", "both workers back", f"{restart['workers_back_s']:.2f}")
    table.add_row("", "all 40 pending futures done", f"{restart['all_pending_done_s']:.2f}")
    recomputed = f"{restart['recomputed']} of {restart['finished_results']}"
    table.add_row("", "finished results recomputed", recomputed)
    killed = figures["client_killed"]
    table.add_row(
        "client SIGKILL, --client-grace 1",
        "its tasks gone, leases back",
        f"{killed['released_s']:.2f} (queued work: {killed['queued_work_s']:g} s)",
    )
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
