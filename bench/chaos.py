"""`make bench-chaos`: the seed's pipeline from 4 clients while processes fail.

20,000 tasks (loads, GPU tasks that take them, MEMORY aggregates of 49
each) from 4 client processes, on a cluster of real processes (127.0.0.1),
while a controller, for a bounded time, at random: SIGKILLs a worker (and
starts a fresh one of its kind), SIGSTOPs one for longer than the worker
ttl and SIGCONTs it, SIGKILLs the scheduler and starts it again on its
--state-dir, retires a worker (``apportion retire``) and adds one.

Then it checks what users would: every client got each of its results
exactly once and right; no worker process ever ran more than it declared
(from the start and end times the tasks themselves wrote); every resource
is back at exactly zero. It prints the faults injected, the runs beyond one
per task, and the time to completion against the same run without faults.

    python -m bench.chaos [--seconds 40] [--tasks 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from bench.clusters import BIN, ROOT, free_port
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

APPORTION = str(BIN / "apportion")
CLIENTS = 4
#: Worker kinds: resources and threads; the cluster starts with one of each
#: and a second GPU worker, and a killed or retired worker is replaced by a
#: fresh one of its kind.
KINDS = {"gpu": ("GPU=2", 2), "memory": ("MEMORY=10e9", 2), "plain": ("", 2)}
START = ["gpu", "gpu", "memory", "plain"]
WORKER_TTL_S = 2.0
#: How long the clients get to finish once the faults stop.
FINISH_TIMEOUT_S = float(os.environ.get("CHAOS_FINISH_TIMEOUT_S", 300))


class Cluster:
    """The scheduler and workers, each started as a user starts them."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        #: worker name -> (kind, process)
        self.workers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        self.gone: list[subprocess.Popen[bytes]] = []
        self._names = itertools.count(1)

    def start_scheduler(self) -> None:
        args = ["scheduler", "--port", str(self.port), "--state-dir", self.state_dir]
        args += ["--worker-ttl", str(WORKER_TTL_S), "--allowed-failures", "1000"]
        proc = _spawn(args, pipe=True)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(30):
                raise TimeoutError("the scheduler did not start")
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"the scheduler did not start: {line!r}")
        self.scheduler = proc

    def add_worker(self, kind: str) -> str:
        resources, nthreads = KINDS[kind]
        name = f"{kind}-{next(self._names)}"
        args = ["worker", self.address, "--no-nanny", "--name", name, "--nthreads", str(nthreads)]
        args += ["--resources", resources, "--drain-timeout", "10"]
        self.workers[name] = (kind, _spawn(args))
        return name

    def declared(self) -> dict[str, dict[str, float]]:
        """Each worker name's declared resources (and threads, as "threads")."""
        out = {}
        for name, (kind, _) in self.workers.items():
            resources, nthreads = KINDS[kind]
            amounts = {k: float(v) for k, v in (p.split("=") for p in resources.split() if p)}
            out[name] = {**amounts, "threads": float(nthreads)}
        return out

    def stop(self) -> None:
        procs = [p for _, p in self.workers.values()] + self.gone
        if self.scheduler is not None:
            procs.append(self.scheduler)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen one must hear the next signal
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: Where each process's log goes (``--logs DIR``; None: nowhere).
LOGS: Path | None = None
_spawned = itertools.count(1)


def _spawn(args: list[str], pipe: bool = False) -> subprocess.Popen[bytes]:
    level = "INFO" if LOGS is not None else "ERROR"
    env = dict(os.environ, APPORTION_LOG_LEVEL=level, PYTHONPATH=str(ROOT))
    env.pop("APPORTION_SCHEDULER__CHECK_INVARIANTS", None)
    stderr = None
    if LOGS is not None:
        name = args[args.index("--name") + 1] if "--name" in args else args[0]
        stderr = (LOGS / f"{next(_spawned):03d}-{name}.log").open("wb")
    try:
        return subprocess.Popen(
            [APPORTION, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    finally:
        if stderr is not None:
            stderr.close()


def state(address: str) -> pb.ClusterState | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply: pb.ClusterState = pb_grpc.SchedulerStub(channel).GetClusterState(
                pb.GetClusterStateRequest(), timeout=5
            )
            return reply
    except grpc.RpcError:
        return None


class Controller:
    """Injects one fault at a time, at random, until ``until``."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.injected: collections.Counter[str] = collections.Counter()
        self.scheduler_restarts_left = 2

    def run(self, until: float, clients: list[subprocess.Popen[bytes]]) -> None:
        while time.monotonic() < until and any(c.poll() is None for c in clients):
            time.sleep(self.rng.uniform(0.5, 2.0))
            fault = self.rng.choice(
                ["kill", "kill", "freeze", "freeze", "retire", "add", "scheduler"]
            )
            if fault == "scheduler" and not self.scheduler_restarts_left:
                fault = "kill"
            getattr(self, f"_{fault}")()
            self.injected[fault] += 1

    def _victim(self) -> tuple[str, str, subprocess.Popen[bytes]]:
        name = self.rng.choice(sorted(self.cluster.workers))
        kind, proc = self.cluster.workers[name]
        return name, kind, proc

    def _kill(self) -> None:
        name, kind, proc = self._victim()
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
        del self.cluster.workers[name]
        self.cluster.gone.append(proc)
        self.cluster.add_worker(kind)

    def _freeze(self) -> None:
        _, _, proc = self._victim()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(self.rng.uniform(WORKER_TTL_S * 1.2, WORKER_TTL_S * 2.5))  # declared lost
        proc.send_signal(signal.SIGCONT)

    def _retire(self) -> None:
        name, kind, proc = self._victim()
        self.cluster.add_worker(kind)  # the new one first: there is somewhere to go
        subprocess.run(
            [APPORTION, "retire", self.cluster.address, name, "--timeout", "30"],
            capture_output=True,
            timeout=60,
        )
        del self.cluster.workers[name]
        self.cluster.gone.append(proc)

    def _add(self) -> None:
        self.cluster.add_worker(self.rng.choice(sorted(KINDS)))

    def _scheduler(self) -> None:
        self.scheduler_restarts_left -= 1
        assert self.cluster.scheduler is not None
        self.cluster.scheduler.kill()
        self.cluster.scheduler.wait()
        self.cluster.gone.append(self.cluster.scheduler)
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.cluster.start_scheduler()


def run_once(tasks: int, seconds: float, seed: int | None) -> dict[str, Any]:
    """One run; faults for ``seconds`` (None seed: no faults). Raises on a wrong outcome."""
    with tempfile.TemporaryDirectory(prefix="apportion-chaos-") as tmp:
        log_dir = Path(tmp, "runs")
        log_dir.mkdir()
        cluster = Cluster(str(Path(tmp, "state")))
        try:
            cluster.start_scheduler()
            for kind in START:
                cluster.add_worker(kind)
            _until(lambda: len((state(cluster.address) or pb.ClusterState()).workers) == 4, 60)
            began = time.monotonic()
            clients = [
                _spawn_client(cluster.address, i, tasks // CLIENTS, str(log_dir))
                for i in range(CLIENTS)
            ]
            controller = Controller(cluster, random.Random(seed))
            if seed is not None:
                controller.run(time.monotonic() + seconds, clients)
            outcomes = [_outcome(c, began + FINISH_TIMEOUT_S + seconds) for c in clients]
            elapsed = time.monotonic() - began
            _until(lambda: _idle(cluster.address), 30)
            runs = _read_runs(log_dir)
            over = _oversubscribed(runs, cluster.declared() | _declared_of_gone(runs))
        finally:
            cluster.stop()
    total = sum(o["tasks"] for o in outcomes)
    wrong = sum(o["wrong"] for o in outcomes)
    undelivered = sum(o["expected_results"] - o["results"] for o in outcomes)
    never_ran = total - len({r["key"] for r in runs})
    if wrong or undelivered or never_ran or over:
        raise AssertionError(
            f"wrong results {wrong}, undelivered {undelivered}, tasks that never ran "
            f"{never_ran}, over-subscribed: {over[:5]}"
        )
    return {
        "tasks": total,
        "runs": len(runs),
        "reruns": len(runs) - len({r["key"] for r in runs}),
        "seconds": elapsed,
        "faults": dict(controller.injected),
    }


def _spawn_client(address: str, index: int, tasks: int, log_dir: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), APPORTION_LOG_LEVEL="ERROR")
    args = [sys.executable, "-m", "bench.chaos_client", address, str(index), str(tasks), log_dir]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
    )


def _outcome(client: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    try:
        out, _ = client.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        raise TimeoutError("a client did not finish") from None
    if client.returncode != 0:
        raise AssertionError(f"a client failed with status {client.returncode}")
    outcome: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return outcome


def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not settle")
        time.sleep(0.1)


def _idle(address: str) -> bool:
    """Every resource back at exactly zero, nothing running, no task left."""
    now = state(address)
    if now is None:
        return False
    held = [v for w in now.workers for v in w.used_resources.values() if v]
    busy = sum(w.running + w.queued for w in now.workers)
    return not held and not busy and not sum(now.task_counts.values())


def _read_runs(log_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for path in log_dir.glob("runs-*.jsonl"):
        runs += [json.loads(line) for line in path.read_text().splitlines() if line]
    return runs


def _declared_of_gone(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Workers no longer in the cluster: declared as their kind (the name says)."""
    out = {}
    for run in runs:
        kind = run["worker"].rsplit("-", 1)[0]
        resources, nthreads = KINDS[kind]
        amounts = {k: float(v) for k, v in (p.split("=") for p in resources.split() if p)}
        out[run["worker"]] = {**amounts, "threads": float(nthreads)}
    return out


def _oversubscribed(runs: list[dict[str, Any]], declared: dict[str, dict[str, float]]) -> list[str]:
    """Moments a worker process held more than it declared (threads included)."""
    by_process: dict[tuple[str, int], list[tuple[float, int, dict[str, float]]]] = {}
    for run in runs:
        held = {**run["resources"], "threads": 1.0}
        events = by_process.setdefault((run["worker"], run["pid"]), [])
        events += [(run["start"], 1, held), (run["end"], -1, held)]
    faults = []
    for (worker, pid), events in by_process.items():
        now: collections.Counter[str] = collections.Counter()
        for at, sign, held in sorted(events, key=lambda e: (e[0], e[1])):  # ends first
            for name, amount in held.items():
                now[name] += sign * amount
                if now[name] > declared[worker].get(name, 0) + 1e-9:
                    faults.append(f"{worker} (pid {pid}) held {now[name]:g} {name} at {at}")
    return faults


@contextmanager
def _table(title: str) -> Iterator[Table]:
    table = Table(title=title)
    yield table
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=40.0, help="how long faults go on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/chaos.json")
    parser.add_argument("--logs", type=Path, help="keep every process's log (INFO) here")
    parser.add_argument("--only-faults", action="store_true", help="skip the run without faults")
    args = parser.parse_args()
    global LOGS
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        LOGS = args.logs
    chaos = run_once(args.tasks, args.seconds, args.seed)
    calm = None if args.only_faults else run_once(args.tasks, 0.0, None)
    with _table("chaos: every result right and delivered once, no worker over its resources") as t:
        for column in ("run", "tasks", "runs", "re-runs", "seconds", "faults injected"):
            t.add_column(column)
        # --only-faults: no run without faults to set against, so no row for one.
        rows = [("faults", chaos)] if calm is None else [("no faults", calm), ("faults", chaos)]
        for label, r in rows:
            faults = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())) or "-"
            t.add_row(
                label,
                str(r["tasks"]),
                str(r["runs"]),
                str(r["reruns"]),
                f"{r['seconds']:.1f}",
                faults,
            )
    if calm is not None:
        print(f"time with faults / without: {chaos['seconds'] / calm['seconds']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"calm": calm, "chaos": chaos, "args": {k: str(v) for k, v in vars(args).items()}}
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
